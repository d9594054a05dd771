#!/usr/bin/env bash
# Delete the TPU VM / pod slice (billing stops; its disks and ~/llama_e_runs go with it).
#
#   tpu_scripts/delete.sh --name llama-e --zone us-west4-a
source "$(dirname "$0")/common.sh"
parse_common "$@"
set -- "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) sed -n '2,5p' "$0"; usage_common; exit 0 ;;
    *) die "delete.sh: unknown argument $1" ;;
  esac
done
location_flags
run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" --quiet
