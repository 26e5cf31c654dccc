#!/usr/bin/env bash
# Submits vit_jax.main as an xpk workload on a GKE TPU cluster (one or several slices).
# xpk (`pip install xpk`) creates a JobSet that starts the same command on every TPU host.
#
#   launch/gke_xpk.sh [--dry-run] CLUSTER WORKLOAD TPU_TYPE NUM_SLICES DOCKER_IMAGE CONFIG WORKDIR \
#       [--config.key=value ...]
#   launch/gke_xpk.sh my-cluster vitb16-i21k v5litepod-256 2 gcr.io/proj/vit_jax:latest \
#       configs/pretrain.py:model=ViT-B_16,dataset=imagenet21k gs://bucket/vitb16 \
#       --config.mesh.dcn_data=2
#
# CONFIG: a recipe file under configs/ or a recipe by name (`pretrain:model=ViT-B_16`).
# --dry-run (first argument) prints the command, shell-quoted, on one line and runs nothing.
# Watch: `xpk workload list --cluster=CLUSTER`; logs: Cloud Logging of the JobSet's pods; stop:
# `xpk workload delete --cluster=CLUSTER --workload=WORKLOAD` (SIGTERM: vit_jax checkpoints the
# current step). Resubmitting with the same WORKDIR resumes. --max-restarts lets the JobSet
# restart all hosts when one fails or is preempted.
# Multi-slice: set --config.mesh.dcn_data (or dcn_fsdp) to NUM_SLICES so the slow DCN links carry
# only the outer mesh axis. The image must contain the repository at /app with its dependencies.
# Arguments are checked against strict patterns (`;`, `$`, backticks, quotes, spaces and newlines
# are refused) and shell-quoted into the workload command.
set -euo pipefail

dry_run=0
if [[ ${1:-} == --dry-run ]]; then
  dry_run=1
  shift
fi

usage() {
  sed -n '5,9p' "$0" >&2
  exit 2
}

check() { # check NAME VALUE REGEX
  if ! [[ $2 =~ $3 ]]; then
    printf 'error: invalid %s: %q (allowed: %s)\n' "$1" "$2" "$3" >&2
    exit 2
  fi
}

[[ $# -ge 7 ]] || usage
cluster=$1 workload=$2 tpu_type=$3 slices=$4 image=$5 config=$6 workdir=$7
shift 7
check cluster "$cluster" '^[a-z][a-z0-9-]{0,39}$'
check workload "$workload" '^[a-z][a-z0-9-]{0,39}$'
check 'TPU type' "$tpu_type" '^v[0-9a-z]+-[0-9]+$'
check 'number of slices' "$slices" '^[1-9][0-9]{0,3}$'
check 'docker image' "$image" '^[A-Za-z0-9_][A-Za-z0-9_./:@-]*$'
check config "$config" '^(configs/[A-Za-z0-9_]+\.py|[a-z][a-z0-9_]*)(:[A-Za-z0-9_=,./+-]*)?$'
check workdir "$workdir" '^gs://[A-Za-z0-9_./-]+$'
for arg in "$@"; do
  check override "$arg" '^--config\.[A-Za-z0-9_.]+=[A-Za-z0-9_=,./:+|()@%-]*$'
done

args=(python -m vit_jax.main "--config=$config" "--workdir=$workdir" "$@")
quoted=$(printf '%q ' "${args[@]}")
xpk_args=(xpk workload create "--cluster=$cluster" "--workload=$workload" "--tpu-type=$tpu_type"
  "--num-slices=$slices" "--docker-image=$image" --max-restarts=3
  "--command=cd /app && ${quoted% }")
if ((dry_run)); then
  line=$(printf '%q ' "${xpk_args[@]}")
  printf '%s\n' "${line% }"
else
  exec "${xpk_args[@]}"
fi
