#!/usr/bin/env bash
# Put the instruction data on every worker (each host reads its own shard of every batch from it).
#
#   tpu_scripts/copy_data.sh --name llama-e --src data/expanded            # a local file or directory
#   tpu_scripts/copy_data.sh --name llama-e --src gs://my-bucket/llama_e   # or a Cloud Storage path
#   ... --dest llama_e_data        # where it lands, relative to the remote home (default)
#
# A local path is copied with scp --worker=all; a gs:// path is fetched by every worker itself
# (`gcloud storage cp -r`), which is faster for big data and needs the VM's service account to read it.
# Training runs in ~/llama_e_jax, so point the run at it with --config.data.files=../llama_e_data/...
# (or --config.data.data_dir=../llama_e_data/... for a tfds directory).
source "$(dirname "$0")/common.sh"
parse_common "$@"

SRC=""
DEST=llama_e_data  # relative to the remote home directory
set -- "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --src) SRC="$2"; shift 2 ;;
    --dest) DEST="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; usage_common; exit 0 ;;
    *) die "copy_data.sh: unknown argument $1" ;;
  esac
done
[[ -n "$SRC" ]] || die "copy_data.sh: --src is required (a local path or gs://...)"

if [[ "$SRC" == gs://* ]]; then
  on_workers all "mkdir -p $DEST && gcloud storage cp -r $(printf '%q' "$SRC") $DEST/"
else
  [[ -e "$SRC" || "$DRY_RUN" -eq 1 ]] || die "copy_data.sh: --src $SRC does not exist"
  on_workers all "mkdir -p $DEST"
  location_flags
  run gcloud compute tpus tpu-vm scp --recurse "$SRC" "$TPU_NAME":"$DEST" "${LOCATION[@]}" --worker=all
fi
