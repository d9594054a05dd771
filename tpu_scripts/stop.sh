#!/usr/bin/env bash
# Stop training on every worker: SIGTERM, which makes llama_e_jax.train finish its step, write a
# checkpoint and exit 0 — launch.sh with the same arguments resumes from it.
#
#   tpu_scripts/stop.sh --name llama-e
source "$(dirname "$0")/common.sh"
parse_common "$@"
set -- "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) sed -n '2,6p' "$0"; usage_common; exit 0 ;;
    *) die "stop.sh: unknown argument $1" ;;
  esac
done
on_workers all "if [ -f $REMOTE_RUNS/train.pid ] && kill -TERM \"\$(cat $REMOTE_RUNS/train.pid)\" 2>/dev/null; \
then echo \"\$(hostname): sent SIGTERM, waiting for the checkpoint\"; \
while kill -0 \"\$(cat $REMOTE_RUNS/train.pid)\" 2>/dev/null; do sleep 2; done; echo \"\$(hostname): stopped\"; \
else echo \"\$(hostname): no training running\"; fi"
