"""`make bench`: named figures written as JSON (see benchmarks/run.py)."""
