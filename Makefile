# Two commands do all set-up on a fresh machine:
#   make demo   meta-train MAML on sinusoid regression (the default job)
#   make test   run the test suite (GPU tests are skipped without a GPU)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export CUDA_HOME ?= /usr/local/cuda

.PHONY: venv install demo test test-gpu bench clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.deps: requirements.txt | $(BIN)/activate
	$(BIN)/pip install -q -r requirements.txt
	touch $@

# learn2learn and higher: oracles for the drop-in tests and baselines for the benchmarks.
$(VENV)/.oracles: $(VENV)/.deps
	PY=$(abspath $(BIN))/python bash tests/install_learn2learn.sh || echo "WARNING: learn2learn could not be installed; its comparison tests will be skipped"
	touch $@

venv: $(VENV)/.deps $(VENV)/.oracles

install: venv
	$(BIN)/pip install -q --no-build-isolation -e .

demo: install
	$(BIN)/metafast train

test: install
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -m "not gpu" -q

test-gpu: install
	$(BIN)/python -m pytest -m gpu -q

bench: install
	$(BIN)/metafast bench

clean:
	rm -rf build *.egg-info metafast/_C*.so
