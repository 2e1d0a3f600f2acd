# Two commands do all set-up on a fresh machine:
#   make demo   meta-train MAML on sinusoid regression (the default job)
#   make test   run the test suite (GPU tests are skipped without a GPU)
#   make bench-pytest   the kernel microbenchmarks under pytest-benchmark (JSON under .benchmarks/)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export CUDA_HOME ?= /usr/local/cuda

.PHONY: venv install demo test test-gpu bench bench-pytest clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.deps: requirements.txt | $(BIN)/activate
	$(BIN)/pip install -q -r requirements.txt
	touch $@

# learn2learn and higher: oracles for the drop-in tests and baselines for the benchmarks.
# The marker is written only when the install succeeded, so a failed one is retried by the next make
# (the comparison tests skip, and -rs lists them, until it works).
$(VENV)/.oracles: $(VENV)/.deps
	if PY=$(abspath $(BIN))/python bash tests/install_learn2learn.sh; then touch $@; \
	else echo "WARNING: learn2learn could not be installed; its comparison tests will be skipped (make retries it)"; fi

venv: $(VENV)/.deps $(VENV)/.oracles

install: venv
	$(BIN)/pip install -q --no-build-isolation -e .

demo: install
	$(BIN)/metafast train

# -rs lists every skipped test with its reason; METAFAST_REQUIRE_EXT=1 (set by .ci/run) turns a missing
# or unloadable metafast._C into a failure instead of skipped C++ kernel tests.
test: install
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -m "not gpu" -q -rs

test-gpu: install
	$(BIN)/python -m pytest -m gpu -q

bench: install
	$(BIN)/metafast bench

bench-pytest: install
	$(BIN)/python -m pytest bench/ --benchmark-only --benchmark-save=microbench -q

clean:
	rm -rf build dist *.egg-info metafast/_C*.so
