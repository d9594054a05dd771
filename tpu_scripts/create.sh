#!/usr/bin/env bash
# Create a TPU VM or a multi-host pod slice, directly or as a queued resource.
#
#   tpu_scripts/create.sh --name llama-e --zone us-west4-a --type v5e-8
#   tpu_scripts/create.sh --name llama-e --zone us-east5-a --type v5p-8 --queued --spot --valid-until 6h
#
# --type is the Cloud accelerator type: v4-8, v5e-8 (= v5litepod-8, the name gcloud takes), v5p-8,
# v6e-8, ... Slices above one host (v4-16+, v5e-16+, v6e-16+) get one VM per host, all driven with
# --worker=all by the other scripts. --version picks the TPU software image (default: the one Google
# lists for JAX on that generation). --spot asks for spot capacity (preemptible at any time, never
# restarted: spot_cycle.sh recreates it). --queued files a queued-resources request instead of a
# direct create (Google's recommended way, also for spot): it waits in the queue until capacity is
# free; --valid-until DURATION (e.g. 6h, 2d) lets it expire unfilled. --valid-until implies --queued.
# The queued resource is named after the TPU (--name), so delete.sh and spot_cycle.sh find it.
source "$(dirname "$0")/common.sh"
parse_common "$@"

TYPE="${TPU_TYPE:-v5litepod-8}"
RUNTIME_VERSION=""
SPOT=0
QUEUED=0
VALID_UNTIL=""
set -- "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --type) TYPE="$2"; shift 2 ;;
    --version) RUNTIME_VERSION="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --valid-until) VALID_UNTIL="$2"; QUEUED=1; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; usage_common; exit 0 ;;
    *) die "create.sh: unknown argument $1" ;;
  esac
done
[[ -z "$VALID_UNTIL" || "$VALID_UNTIL" =~ ^[0-9]+[smhd]$ ]] \
  || die "create.sh: --valid-until takes a duration like 30m, 6h or 2d, got '$VALID_UNTIL'"

ACCELERATOR_TYPE="$(accelerator_type "$TYPE")"
if [[ -z "$RUNTIME_VERSION" ]]; then RUNTIME_VERSION="$(default_runtime "$ACCELERATOR_TYPE")"; fi
OPTIONS=()
if [[ "$SPOT" -eq 1 ]]; then OPTIONS+=(--spot); fi
if [[ -n "$VALID_UNTIL" ]]; then OPTIONS+=(--valid-until-duration="$VALID_UNTIL"); fi

location_flags
if [[ "$QUEUED" -eq 1 ]]; then
  run gcloud compute tpus queued-resources create "$TPU_NAME" "${LOCATION[@]}" --node-id="$TPU_NAME" \
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${OPTIONS[@]+"${OPTIONS[@]}"}"
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${OPTIONS[@]+"${OPTIONS[@]}"}"
fi
