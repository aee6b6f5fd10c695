"""Reports for people: attention heat maps (`heatmap`), self-contained HTML galleries (`gallery`), plots (`plots`).

matplotlib (plots) is imported lazily, with the Agg backend, only where a plot is drawn.
"""
