#!/usr/bin/env bash
# Delete the TPU VM / pod slice (billing stops; its disks and ~/llama_e_runs go with it).
#
#   tpu_scripts/delete.sh --name llama-e --zone us-west4-a
#   tpu_scripts/delete.sh --name llama-e --zone us-west4-a --queued   # created with create.sh --queued
#
# --queued deletes the queued resource of that name and, with --force, the TPU it holds.
source "$(dirname "$0")/common.sh"
parse_common "$@"
QUEUED=0
set -- "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --queued) QUEUED=1; shift ;;
    -h|--help) sed -n '2,7p' "$0"; usage_common; exit 0 ;;
    *) die "delete.sh: unknown argument $1" ;;
  esac
done
location_flags
if [[ "$QUEUED" -eq 1 ]]; then
  run gcloud compute tpus queued-resources delete "$TPU_NAME" "${LOCATION[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" --quiet
fi
