#!/usr/bin/env bash
# Keep a spot training run alive: PREEMPTED -> delete -> recreate -> install -> copy data -> relaunch.
#
#   tpu_scripts/spot_cycle.sh --name llama-e --zone us-west4-a --type v5e-8 --queued \
#       --data gs://my-bucket/llama_e/expanded --model gs://my-bucket/models/llama-7b-hf --watch 300 \
#       -- --config configs/llama_7b_lora.py --config.run_dir=gs://my-bucket/runs/llama7b \
#          --config.model.path=../llama_e_models/llama-7b-hf --config.data.files=../llama_e_data/expanded
#
# Google deletes a spot TPU's VMs on preemption and never restarts them ("you must recreate them"):
# the boot disks, the installed venv and anything written under ~ are gone. So the run directory
# must be a gs:// path (checkpoints survive in the bucket; training resumes from its latest one),
# and this script refuses training arguments without --config.run_dir=gs://...
#
# One pass asks gcloud for the state (of the queued resource with --queued, else of the TPU VM):
#   PREEMPTED / TERMINATED (TPU VM), SUSPENDED / FAILED (queued resource): delete, then as missing;
#   missing (NOT_FOUND): create.sh --spot, wait until READY / ACTIVE, install.sh, copy_data.sh
#     (--data), stage_model.sh (--model), launch.sh with the training arguments;
#   anything else (READY, CREATING, WAITING_FOR_RESOURCES, ...): nothing to do.
# --hosts N is passed to launch.sh (else it asks gcloud how many hosts the slice has).
# --watch SECONDS repeats the pass forever at that interval; without it, one pass.
# --dry-run prints every command of a full cycle; the state is then --assume-state (default PREEMPTED).
source "$(dirname "$0")/common.sh"
parse_common "$@"
SCRIPTS="$(cd "$(dirname "$0")" && pwd)"

TYPE=v5litepod-8
QUEUED=0
DATA=""
MODEL=""
WATCH=0
HOSTS=()
ASSUMED_STATE=PREEMPTED
TRAIN_ARGS=()
set -- "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --type) TYPE="$2"; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --data) DATA="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --watch) WATCH="$2"; shift 2 ;;
    --hosts) HOSTS=(--hosts "$2"); shift 2 ;;
    --assume-state) ASSUMED_STATE="$2"; shift 2 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    -h|--help) sed -n '2,23p' "$0"; usage_common; exit 0 ;;
    *) die "spot_cycle.sh: unknown argument $1 (training arguments go after --)" ;;
  esac
done
[[ "$WATCH" =~ ^[0-9]+$ ]] || die "spot_cycle.sh: --watch takes seconds, got '$WATCH'"
TYPE="$(accelerator_type "$TYPE")"
RUN_DIR=""
for arg in "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}"; do
  if [[ "$arg" == --config.run_dir=* ]]; then RUN_DIR="${arg#--config.run_dir=}"; fi
done
[[ "$RUN_DIR" == gs://?* ]] || die "spot_cycle.sh: pass --config.run_dir=gs://BUCKET/RUN after --: a preempted spot TPU \
is deleted with its disks, so checkpoints must live in a bucket to resume (got '${RUN_DIR:-no run_dir}')"

# The flags every sub-script gets: same TPU, same place, same dry-run.
COMMON=(--name "$TPU_NAME")
if [[ -n "$TPU_ZONE" ]]; then COMMON+=(--zone "$TPU_ZONE"); fi
if [[ -n "$TPU_PROJECT" ]]; then COMMON+=(--project "$TPU_PROJECT"); fi
if [[ "$DRY_RUN" -eq 1 ]]; then COMMON+=(--dry-run); fi
QUEUED_FLAG=()
if [[ "$QUEUED" -eq 1 ]]; then QUEUED_FLAG=(--queued); fi

# current_state: the state word gcloud reports, or NOT_FOUND.
current_state() {
  location_flags
  local describe=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOCATION[@]}" --format='value(state)')
  if [[ "$QUEUED" -eq 1 ]]; then
    describe=(gcloud compute tpus queued-resources describe "$TPU_NAME" "${LOCATION[@]}" --format='value(state.state)')
  fi
  if [[ "$DRY_RUN" -eq 1 ]]; then
    run "${describe[@]}" >&2
    echo "$ASSUMED_STATE"
    return
  fi
  "${describe[@]}" 2>/dev/null || echo NOT_FOUND
}

wait_until_ready() {
  local state
  while true; do
    state="$(current_state)"
    case "$state" in
      READY|ACTIVE) return ;;
      FAILED|SUSPENDED|PREEMPTED|TERMINATED) die "spot_cycle.sh: $TPU_NAME went to $state while waiting for it" ;;
      *) echo "$TPU_NAME: $state, waiting" >&2; sleep 30 ;;
    esac
  done
}

recreate() {
  bash "$SCRIPTS/create.sh" "${COMMON[@]}" --type "$TYPE" --spot "${QUEUED_FLAG[@]+"${QUEUED_FLAG[@]}"}"
  if [[ "$DRY_RUN" -eq 0 ]]; then wait_until_ready; fi
  bash "$SCRIPTS/install.sh" "${COMMON[@]}"
  if [[ -n "$DATA" ]]; then bash "$SCRIPTS/copy_data.sh" "${COMMON[@]}" --src "$DATA"; fi
  if [[ -n "$MODEL" ]]; then bash "$SCRIPTS/stage_model.sh" "${COMMON[@]}" --src "$MODEL"; fi
  bash "$SCRIPTS/launch.sh" "${COMMON[@]}" "${HOSTS[@]+"${HOSTS[@]}"}" -- "${TRAIN_ARGS[@]}"
}

one_pass() {
  local state
  state="$(current_state)"
  echo "$(date -u +%FT%TZ) $TPU_NAME: ${state:-NOT_FOUND}" >&2
  case "${state:-NOT_FOUND}" in
    PREEMPTED|TERMINATED|SUSPENDED|FAILED)
      bash "$SCRIPTS/delete.sh" "${COMMON[@]}" "${QUEUED_FLAG[@]+"${QUEUED_FLAG[@]}"}"
      recreate ;;
    NOT_FOUND) recreate ;;
    *) ;;
  esac
}

one_pass
while [[ "$WATCH" -gt 0 ]]; do
  sleep "$WATCH"
  one_pass
done
