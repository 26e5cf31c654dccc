#!/usr/bin/env bash
# Submits vit_jax.main as an xpk workload on a GKE TPU cluster (one or several slices).
#
#   launch/gke_xpk.sh CLUSTER WORKLOAD TPU_TYPE NUM_SLICES DOCKER_IMAGE CONFIG WORKDIR [--config.k=v ...]
#   launch/gke_xpk.sh my-cluster vitb16-i21k v5litepod-256 2 gcr.io/proj/vit_jax:latest \
#       configs/pretrain.py:model=ViT-B_16,dataset=imagenet21k gs://bucket/vitb16 \
#       --config.mesh.dcn_data=2
#
# Multi-slice: set --config.mesh.dcn_data (or dcn_fsdp) to NUM_SLICES so the slow DCN links carry
# only the outer mesh axis. The image must contain the repository at /app with its dependencies.
# Arguments are validated against strict patterns and shell-quoted into the workload command.
set -euo pipefail

usage() { sed -n '2,11p' "$0" >&2; exit 2; }
[[ $# -ge 7 ]] || usage
cluster=$1 workload=$2 tpu_type=$3 slices=$4 image=$5 config=$6 workdir=$7
shift 7

check() {
  [[ $2 =~ $3 ]] || { echo "error: invalid $1: '$2' (allowed: $3)" >&2; exit 2; }
}
check cluster "$cluster" '^[a-z][a-z0-9-]{0,39}$'
check workload "$workload" '^[a-z][a-z0-9-]{0,39}$'
check 'TPU type' "$tpu_type" '^v[0-9a-z]+-[0-9]+$'
check 'number of slices' "$slices" '^[1-9][0-9]{0,3}$'
check 'docker image' "$image" '^[A-Za-z0-9_./:@-]+$'
check config "$config" '^configs/[A-Za-z0-9_]+\.py(:[A-Za-z0-9_=,./+-]*)?$'
check workdir "$workdir" '^gs://[A-Za-z0-9_./-]+$'
for arg in "$@"; do
  check override "$arg" '^--config\.[A-Za-z0-9_.]+=[A-Za-z0-9_=,./:+-]*$'
done

args=(python -m vit_jax.main "--config=$config" "--workdir=$workdir" "$@")
command="cd /app && $(printf '%q ' "${args[@]}")"
echo "+ xpk workload $workload on $cluster: $command" >&2
exec xpk workload create --cluster="$cluster" --workload="$workload" --tpu-type="$tpu_type" \
  --num-slices="$slices" --docker-image="$image" --command="$command"
