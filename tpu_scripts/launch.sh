#!/usr/bin/env bash
# Start training on every worker of the slice, in the background, logging to ~/llama_e_runs/train.log.
#
#   tpu_scripts/launch.sh --name llama-e -- --config configs/default.py --config.mesh.fsdp=-1 --config.mesh.data=1
#   tpu_scripts/launch.sh --name llama-e-pod --hosts 4 -- --config ... --config.run_dir=/mnt/shared/run1
#
# Everything after -- goes to `python -m llama_e_jax.train`. On a slice with more than one host the
# workers join one JAX job (LLAMA_E_DISTRIBUTED=auto: jax.distributed.initialize() finds the other
# hosts from the TPU metadata), so the mesh spans all chips. --hosts N skips asking gcloud for the
# number of hosts. Multi-host checkpoints need a run_dir every host can reach (a gs:// bucket path).
# --env NAME=VALUE (repeatable) sets an environment variable for training on every worker, e.g.
# --env LIBTPU_INIT_ARGS="--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true" (docs/tpu.md).
source "$(dirname "$0")/common.sh"
parse_common "$@"

HOSTS=""
ENVIRONMENT=""
TRAIN_ARGS=()
set -- "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hosts) HOSTS="$2"; shift 2 ;;
    --env)
      [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "launch.sh: --env takes NAME=VALUE, got '$2'"
      ENVIRONMENT+=" $(printf '%q' "$2")"; shift 2 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    -h|--help) sed -n '2,14p' "$0"; usage_common; exit 0 ;;
    *) die "launch.sh: unknown argument $1 (training arguments go after --)" ;;
  esac
done
if [[ -z "$HOSTS" ]]; then HOSTS="$(num_workers)"; fi
[[ "$HOSTS" =~ ^[1-9][0-9]*$ ]] || die "launch.sh: --hosts must be a positive integer, got '$HOSTS'"

DISTRIBUTED=off
if [[ "$HOSTS" -gt 1 ]]; then DISTRIBUTED=auto; fi
QUOTED_ARGS=""
if [[ ${#TRAIN_ARGS[@]} -gt 0 ]]; then QUOTED_ARGS="$(printf ' %q' "${TRAIN_ARGS[@]}")"; fi
on_workers all "mkdir -p $REMOTE_RUNS && cd $REMOTE_DIR \
&& (LLAMA_E_DISTRIBUTED=$DISTRIBUTED$ENVIRONMENT nohup ../$REMOTE_VENV/bin/python -m llama_e_jax.train$QUOTED_ARGS \
> ../$REMOTE_RUNS/train.log 2>&1 < /dev/null & echo \$! > ../$REMOTE_RUNS/train.pid) \
&& echo \"\$(hostname): started pid \$(cat ../$REMOTE_RUNS/train.pid)\""
