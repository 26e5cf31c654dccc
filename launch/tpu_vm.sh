#!/usr/bin/env bash
# Runs vit_jax.main on every host of a Cloud TPU VM (pod slice): one process per host; JAX finds
# its peers through the TPU metadata (jax.distributed.initialize() without arguments).
#
#   launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   launch/tpu_vm.sh my-v4-32 us-central2-b configs/pretrain.py:model=ViT-B_16,dataset=imagenet2012 \
#       gs://my-bucket/vit_b16 --config.batch_size=4096
#
# Assumes the repository is checked out at ~/vit_jax on every host with its .venv set up
# (e.g. once: launch/tpu_vm.sh ... with SETUP=1). WORKDIR should be a gs:// path every host can write.
# Every argument is validated against a strict pattern and shell-quoted before it reaches the remote
# shell, so no remote command is ever built from unchecked text.
set -euo pipefail

usage() { sed -n '2,12p' "$0" >&2; exit 2; }
[[ $# -ge 4 ]] || usage
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4

check() {  # check NAME VALUE REGEX
  [[ $2 =~ $3 ]] || { echo "error: invalid $1: '$2' (allowed: $3)" >&2; exit 2; }
}
check 'TPU name' "$tpu" '^[a-z][a-z0-9-]{0,62}$'
check zone "$zone" '^[a-z]+-[a-z]+[0-9]+-[a-z]$'
check config "$config" '^configs/[A-Za-z0-9_]+\.py(:[A-Za-z0-9_=,./+-]*)?$'
check workdir "$workdir" '^(gs://)?[A-Za-z0-9_./-]+$'
for arg in "$@"; do
  check 'override' "$arg" '^--config\.[A-Za-z0-9_.]+=[A-Za-z0-9_=,./:+-]*$'
done

remote_dir=${REMOTE_DIR:-vit_jax}
check 'REMOTE_DIR' "$remote_dir" '^[A-Za-z0-9_./-]+$'
args=(.venv/bin/python -m vit_jax.main "--config=$config" "--workdir=$workdir" "$@")
quoted=$(printf '%q ' "${args[@]}")
setup=''
if [[ ${SETUP:-0} == 1 ]]; then
  setup="make setup && "
fi
remote="cd $(printf '%q' "$remote_dir") && ${setup}${quoted}"

echo "+ on all workers of $tpu ($zone): $remote" >&2
exec gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$remote"
