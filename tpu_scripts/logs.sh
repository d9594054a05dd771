#!/usr/bin/env bash
# Follow the training log of one worker (default 0, the one that prints metrics), Ctrl-C to stop.
#
#   tpu_scripts/logs.sh --name llama-e              # worker 0, follow
#   tpu_scripts/logs.sh --name llama-e --worker 2 --lines 200 --no-follow
source "$(dirname "$0")/common.sh"
parse_common "$@"

WORKER=0
LINES=100
FOLLOW=(-f)
set -- "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --worker) WORKER="$2"; shift 2 ;;
    --lines) LINES="$2"; shift 2 ;;
    --no-follow) FOLLOW=(); shift ;;
    -h|--help) sed -n '2,6p' "$0"; usage_common; exit 0 ;;
    *) die "logs.sh: unknown argument $1" ;;
  esac
done
[[ "$WORKER" =~ ^[0-9]+$ ]] || die "logs.sh: --worker must be a worker number, got '$WORKER'"
[[ "$LINES" =~ ^[0-9]+$ ]] || die "logs.sh: --lines must be a number, got '$LINES'"
on_workers "$WORKER" "tail -n $LINES ${FOLLOW[*]+"${FOLLOW[*]}"} $REMOTE_RUNS/train.log"
