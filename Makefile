# The install step pins torch to the releases that lie on these machines' local disk;
# pyproject.toml keeps open ranges for real users.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH_PINS = torch==2.14.1 torchvision==0.29.1
DEMO_OUT ?= demo_out

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[all]' $(TORCH_PINS)
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/dnnshifter demo --out $(DEMO_OUT)

test: install
	$(PY) -m pytest -q tests

# Every benchmark, on the demo's checkpoints and portfolio (trained first if $(DEMO_OUT) has none);
# rewrites the README tables and benchmarks/results/*.json.
bench: install
	test -f $(DEMO_OUT)/portfolio/manifest.json || $(VENV)/bin/dnnshifter demo --out $(DEMO_OUT) --no-serve
	$(PY) benchmarks/bench_training.py --readme
	$(PY) benchmarks/bench_training.py --long --readme
	$(PY) benchmarks/bench_pruning.py --imp-dir $(DEMO_OUT)/imp --readme
	$(PY) benchmarks/bench_switching.py --portfolio $(DEMO_OUT)/portfolio --readme
	$(PY) benchmarks/bench_serving.py --portfolio $(DEMO_OUT)/portfolio --readme
	$(PY) benchmarks/summary.py --readme

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache build *.egg-info
