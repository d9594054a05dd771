#!/usr/bin/env bash
# Copy this checkout to every worker and install it with TPU support, in a virtualenv.
#
#   tpu_scripts/install.sh --name llama-e --zone us-west4-a
#
# The working tree (uncommitted changes included; .git, virtualenvs and runs/ left out) is packed,
# copied with scp --worker=all, unpacked into ~/llama_e_jax and installed with `pip install -e '.[tpu]'`
# (jax with libtpu) into ~/llama_e_venv; the default model is fetched so the first run starts at once.
source "$(dirname "$0")/common.sh"
parse_common "$@"
set -- "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) sed -n '2,9p' "$0"; usage_common; exit 0 ;;
    *) die "install.sh: unknown argument $1" ;;
  esac
done

REPO="$(cd "$(dirname "$0")/.." && pwd)"
ARCHIVE="${TMPDIR:-/tmp}/llama_e_jax-src.tar.gz"
run tar -C "$REPO" -czf "$ARCHIVE" --exclude=.git --exclude='.venv*' --exclude=runs \
  --exclude=__pycache__ --exclude='*.egg-info' .
location_flags
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME":llama_e_jax-src.tar.gz "${LOCATION[@]}" --worker=all
on_workers all "set -e; mkdir -p $REMOTE_DIR && tar -xzf ~/llama_e_jax-src.tar.gz -C $REMOTE_DIR \
&& python3 -m venv $REMOTE_VENV && $REMOTE_VENV/bin/pip install -q --upgrade pip \
&& $REMOTE_VENV/bin/pip install -q -e \"./${REMOTE_DIR}[tpu]\" \
&& cd $REMOTE_DIR && ../$REMOTE_VENV/bin/python -m llama_e_jax.io.default_model \
&& ../$REMOTE_VENV/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)'"
