#!/usr/bin/env bash
# Stage base weights from a bucket onto every worker's disk (each host then reads only its shards).
#
#   tpu_scripts/stage_model.sh --name llama-e --src gs://my-bucket/models/llama-7b-hf
#   ... --dest llama_e_models/llama-7b-hf      # relative to the remote home (default: llama_e_models/<last part of --src>)
#
# Every worker runs `gcloud storage rsync --recursive` from the bucket itself, in parallel: no copy
# passes through your machine, and a rerun (e.g. after a spot TPU was recreated with a fresh disk,
# or an interrupted copy) only fetches what is missing. The VM's service account needs read access
# to the bucket. Sizes to plan the boot disk for (bf16): 7B 13 GB, 13B 26 GB, 30B 65 GB, 65B 130 GB;
# the default TPU VM boot disk is 100 GB, so for 65B+ either pass --dest on an attached data disk
# or do not stage: point --config.model.path at a gcsfuse mount of the bucket instead, from which
# each host's sharded loader reads only the byte ranges of its own shards.
# Then train with --config.model.path=../<dest> (training runs in ~/llama_e_jax).
source "$(dirname "$0")/common.sh"
parse_common "$@"

SRC=""
DEST=""
set -- "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --src) SRC="$2"; shift 2 ;;
    --dest) DEST="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; usage_common; exit 0 ;;
    *) die "stage_model.sh: unknown argument $1" ;;
  esac
done
[[ "$SRC" == gs://?* ]] || die "stage_model.sh: --src must be a gs:// path to a checkpoint directory, got '$SRC'"
SRC="${SRC%/}"
if [[ -z "$DEST" ]]; then DEST="llama_e_models/${SRC##*/}"; fi
[[ "$DEST" != /* && "$DEST" != *..* ]] || die "stage_model.sh: --dest must be relative to the remote home, got '$DEST'"

on_workers all "mkdir -p $(printf '%q' "$DEST") && gcloud storage rsync --recursive $(printf '%q' "$SRC") \
$(printf '%q' "$DEST") && echo \"\$(hostname): \$(du -sh $(printf '%q' "$DEST") | cut -f1) in ~/$(printf '%q' "$DEST")\""
