#!/usr/bin/env bash
# Runs ON each TPU VM worker (install.sh copies the checkout there and starts this): a Python 3.11
# virtualenv with the package and jax[tpu], then a check that JAX sees the TPU.
#
#   bash llama_e_jax/tpu_scripts/worker_setup.sh [--python 3.11] [--venv ~/llama_e_venv] [--src ~/llama_e_jax] [--dry-run]
#
# Why uv: the stock TPU images (tpu-ubuntu2204-base, v2-alpha-tpuv5-lite, v2-alpha-tpuv5,
# v2-alpha-tpuv6e) are Ubuntu 22.04, whose python3 is 3.10, and the package needs >= 3.11. Ubuntu
# 22.04's own archive has no stable 3.11 (only a release candidate in universe, and apt needs root);
# the deadsnakes PPA is a third-party source. `uv` (from PyPI, installed with the image's pip into
# ~/.local) fetches a standalone CPython build of the pinned minor version (--python, default 3.11,
# the version CI tests) into ~/.local/share/uv, without root, identical on every worker, and
# creates the venv from it; the image's python3 is only used to install uv.
set -euo pipefail

PYTHON_VERSION=3.11
VENV="$HOME/llama_e_venv"
SRC="$HOME/llama_e_jax"
DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) PYTHON_VERSION="$2"; shift 2 ;;
    --venv) VENV="$2"; shift 2 ;;
    --src) SRC="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "error: worker_setup.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ "$PYTHON_VERSION" =~ ^3\.(1[1-9]|[2-9][0-9])(\.[0-9]+)?$ ]] \
  || { echo "error: worker_setup.sh: --python must be 3.11 or newer (the package requires it), got '$PYTHON_VERSION'" >&2; exit 2; }

step() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ "$DRY_RUN" -eq 0 ]]; then "$@"; fi
}

UV="$HOME/.local/bin/uv"
step python3 -m pip install --user --quiet --upgrade "uv>=0.5"
step "$UV" python install "$PYTHON_VERSION"
step "$UV" venv --python "$PYTHON_VERSION" --seed --allow-existing "$VENV"
step "$UV" pip install --python "$VENV/bin/python" --quiet -e "${SRC}[tpu]"
step "$VENV/bin/python" -c "import sys; assert sys.version_info >= (3, 11), sys.version; print(sys.version)"
# The default model, fetched once so that the first run starts at once.
step env -C "$SRC" "$VENV/bin/python" -m llama_e_jax.io.default_model
step "$VENV/bin/python" -c \
  "import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)"
