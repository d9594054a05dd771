#!/usr/bin/env bash
# Copy this checkout to every worker and install it with TPU support, in a Python 3.11 virtualenv.
#
#   tpu_scripts/install.sh --name llama-e --zone us-west4-a [--python 3.11]
#
# The working tree (uncommitted changes included; .git, virtualenvs and runs/ left out) is packed,
# copied with scp --worker=all and unpacked into ~/llama_e_jax; then tpu_scripts/worker_setup.sh runs
# on every worker: uv (from PyPI) installs a standalone CPython of the pinned version — the stock
# Ubuntu 22.04 TPU images ship Python 3.10, the package needs >= 3.11 — makes ~/llama_e_venv from
# it and installs `-e '.[tpu]'` (jax with libtpu). Run it again after every recreate of a spot TPU.
source "$(dirname "$0")/common.sh"
parse_common "$@"
PYTHON_VERSION=3.11
set -- "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) PYTHON_VERSION="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; usage_common; exit 0 ;;
    *) die "install.sh: unknown argument $1" ;;
  esac
done

REPO="$(cd "$(dirname "$0")/.." && pwd)"
ARCHIVE="${TMPDIR:-/tmp}/llama_e_jax-src.tar.gz"
run tar -C "$REPO" -czf "$ARCHIVE" --exclude=.git --exclude='.venv*' --exclude=runs \
  --exclude=__pycache__ --exclude='*.egg-info' .
location_flags
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME":llama_e_jax-src.tar.gz "${LOCATION[@]}" --worker=all
on_workers all "set -e; mkdir -p $REMOTE_DIR && tar -xzf llama_e_jax-src.tar.gz -C $REMOTE_DIR \
&& bash $REMOTE_DIR/tpu_scripts/worker_setup.sh --python $(printf '%q' "$PYTHON_VERSION") \
--venv \"\$HOME/$REMOTE_VENV\" --src \"\$HOME/$REMOTE_DIR\""
