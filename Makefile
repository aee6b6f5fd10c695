# mmcross developer targets. `make help` lists them.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help install demo test test-slow lint bench bench-train screenshot

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP)  ## Create .venv/ and install mmcross with dev extras (seconds when nothing changed)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -c "import torch, torchvision.ops, open_clip; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'open_clip', open_clip.__version__)"
	touch $(STAMP)

demo: install  ## The whole tool offline in minutes: synth data, train, index, search, eval, gallery, heat map
	bash scripts/demo.sh

test: install  ## Fast tests (tiny random-init models, generated data)
	$(PY) -m pytest -q

test-slow: install  ## Slow tests too (ViT-B-32, real Flickr8k data in ../shared)
	$(PY) -m pytest -q -m "slow or not slow"

lint: install  ## ruff check and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

screenshot: install  ## Search gallery in headless Chromium (apt-get install chromium) -> build/screenshots/
	MMCROSS_SCREENSHOT=build/screenshots/search-gallery.png $(PY) -m pytest -q -m slow tests/test_report_chromium.py

bench: install  ## Benchmarks (the fast extra's int8/onnx/openvino paths included) -> bench-results.json
	$(PY) -m pip install --quiet -e '.[dev,fast]'
	$(PY) -m benchmarks.run --out bench-results.json

bench-train: install  ## mmcross train vs open_clip_train, same tower/data/15 min each (FULL=1: an hour) -> bench-train.json
	$(PY) -m pip install --quiet -e '.[dev,peers]'
	$(PY) -m benchmarks.bench_train --out bench-train.json $(if $(FULL),--full,)
