# Two commands do all set-up on a fresh machine (see README):
#   make train   - create .venv, install, fetch the default model, run the default LoRA training
#   make test    - create .venv, install, fetch the default model, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

TPU_VENV := .venv-tpu
TPU_STAMP := $(TPU_VENV)/.installed-stamp

.PHONY: setup train test bench browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m llama_e_jax.io.default_model
	touch $(STAMP)

# The TPU fit-check tests compile for TPU topologies with libtpu, which pins jax: its own venv.
$(TPU_STAMP): pyproject.toml
	$(PYTHON) -m venv $(TPU_VENV)
	$(TPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(TPU_VENV)/bin/python -m pip install -q -e '.[tpu]'
	touch $(TPU_STAMP)

setup: $(STAMP)

train: setup
	$(PY) -m llama_e_jax.train $(ARGS)

# The playground's browser test (tests/test_playground.py) drives Debian's headless Chromium through
# chromedriver; install them when missing (as root, as CI runs), otherwise the test skips saying so.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	else echo "chromium / chromium-driver missing and not root: the browser test will skip" \
	     "(sudo apt-get install -y chromium chromium-driver)"; fi

test: setup $(TPU_STAMP) browser
	$(PY) -m pytest -q tests $(ARGS)

bench: setup
	$(PY) -m bench.run_all $(ARGS)
