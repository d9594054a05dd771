#!/usr/bin/env bash
# Create a TPU VM or a multi-host pod slice.
#
#   tpu_scripts/create.sh --name llama-e --zone us-west4-a --type v5litepod-8
#   tpu_scripts/create.sh --name llama-e-pod --zone us-central2-b --type v4-32 --spot --dry-run
#
# --type is the Cloud accelerator type (v4-8, v5litepod-16, v5p-8, v6e-8, ...); slices above one host
# (v4-16+, v5litepod-16+, v6e-16+) get one VM per host, all driven with --worker=all by the other scripts.
# --version picks the TPU software image; the default suits the type. --spot asks for spot capacity.
source "$(dirname "$0")/common.sh"
parse_common "$@"

ACCELERATOR_TYPE="${TPU_TYPE:-v5litepod-8}"
RUNTIME_VERSION=""
CAPACITY=()
set -- "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --type) ACCELERATOR_TYPE="$2"; shift 2 ;;
    --version) RUNTIME_VERSION="$2"; shift 2 ;;
    --spot) CAPACITY+=(--spot); shift ;;
    -h|--help) sed -n '2,10p' "$0"; usage_common; exit 0 ;;
    *) die "create.sh: unknown argument $1" ;;
  esac
done

default_runtime() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "unknown accelerator type $1 (expected v4-N, v5litepod-N, v5p-N or v6e-N); pass --version" ;;
  esac
}
if [[ -z "$RUNTIME_VERSION" ]]; then RUNTIME_VERSION="$(default_runtime "$ACCELERATOR_TYPE")"; fi

location_flags
run gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}" \
  --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${CAPACITY[@]+"${CAPACITY[@]}"}"
