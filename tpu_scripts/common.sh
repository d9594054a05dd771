#!/usr/bin/env bash
# Shared flags and helpers for the TPU VM scripts; sourced, never run.
#
# Every script accepts:
#   --name NAME        TPU VM / pod slice name          (env TPU_NAME, default llama-e)
#   --zone ZONE        e.g. us-central2-b               (env TPU_ZONE, or gcloud's compute/zone)
#   --project PROJECT  GCP project                      (env TPU_PROJECT, or gcloud's core/project)
#   --dry-run          print the exact gcloud commands instead of running them
# Commands are printed (shell-quoted, ready to paste) before they run, so logs show what happened.

set -euo pipefail

TPU_NAME="${TPU_NAME:-llama-e}"
TPU_ZONE="${TPU_ZONE:-}"
TPU_PROJECT="${TPU_PROJECT:-}"
DRY_RUN=0
# Paths on the workers, relative to the remote home directory (ssh and scp both start there).
# shellcheck disable=SC2034  # used by the scripts that source this file
REMOTE_DIR=llama_e_jax      # package checkout on every worker
# shellcheck disable=SC2034
REMOTE_VENV=llama_e_venv    # its virtualenv
# shellcheck disable=SC2034
REMOTE_RUNS=llama_e_runs    # logs and pid files of launched runs
EXTRA_ARGS=()

usage_common() {
  cat <<'USAGE'
common flags: --name NAME  --zone ZONE  --project PROJECT  --dry-run  -h|--help
USAGE
}

# parse_common "$@": consumes the common flags, leaves the rest in EXTRA_ARGS.
parse_common() {
  EXTRA_ARGS=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --name) TPU_NAME="$2"; shift 2 ;;
      --zone) TPU_ZONE="$2"; shift 2 ;;
      --project) TPU_PROJECT="$2"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --name=*) TPU_NAME="${1#*=}"; shift ;;
      --zone=*) TPU_ZONE="${1#*=}"; shift ;;
      --project=*) TPU_PROJECT="${1#*=}"; shift ;;
      *) EXTRA_ARGS+=("$1"); shift ;;
    esac
  done
}

die() {
  echo "error: $*" >&2
  exit 2
}

# location_flags: --zone/--project flags for gcloud (omitted when unset: gcloud's defaults apply).
location_flags() {
  LOCATION=()
  if [[ -n "$TPU_ZONE" ]]; then LOCATION+=(--zone="$TPU_ZONE"); fi
  if [[ -n "$TPU_PROJECT" ]]; then LOCATION+=(--project="$TPU_PROJECT"); fi
}

# accelerator_type TYPE: the Cloud accelerator type gcloud takes. The docs name v5e slices both
# "v5e-8" (prose, pricing) and "v5litepod-8" (the API's type); gcloud wants the latter.
accelerator_type() {
  case "$1" in
    v5e-*) echo "v5litepod-${1#v5e-}" ;;
    v4-[0-9]*|v5litepod-[0-9]*|v5p-[0-9]*|v6e-[0-9]*) echo "$1" ;;
    *) die "unknown accelerator type '$1' (expected v4-N, v5e-N = v5litepod-N, v5p-N or v6e-N)" ;;
  esac
}

# default_runtime TYPE: the TPU software version Google lists for JAX on that TPU generation
# (cloud.google.com/tpu/docs/runtimes: "PyTorch and JAX").
default_runtime() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default runtime for accelerator type $1; pass --version" ;;
  esac
}

# run CMD...: print the command, then run it unless --dry-run.
run() {
  local arg
  printf '+'
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf ' %s' "$arg"; else printf ' %s' "${arg@Q}"; fi
  done
  printf '\n'
  if [[ "$DRY_RUN" -eq 0 ]]; then
    "$@"
  fi
}

# on_workers WORKER REMOTE_COMMAND: run a shell command on one worker (0, 1, ...) or on all.
on_workers() {
  local worker="$1" command="$2"
  location_flags
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$worker" --command="$command"
}

# num_workers: hosts in the slice (1 for a single TPU VM); asks gcloud, or 1 under --dry-run.
num_workers() {
  location_flags
  if [[ "$DRY_RUN" -eq 1 ]]; then
    echo "# dry run: assuming 1 host (pass --hosts N); a real run asks:" \
      "gcloud compute tpus tpu-vm describe $TPU_NAME ${LOCATION[*]+"${LOCATION[*]}"}" >&2
    echo 1
    return
  fi
  gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOCATION[@]}" \
    --format='value(networkEndpoints[].ipAddress)' | tr ';' '\n' | grep -c .
}
