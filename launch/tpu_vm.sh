#!/usr/bin/env bash
# Cloud TPU VM slices: create one (queued resource, optionally spot), install vit_jax on every
# worker, start `python -m vit_jax.main` on all workers at once, stream the logs, stop, tear down.
#
#   launch/tpu_vm.sh [--dry-run] create  NAME ZONE ACCELERATOR [--spot]   # e.g. v4-64, v5litepod-256
#   launch/tpu_vm.sh [--dry-run] install NAME ZONE       # this checkout (git HEAD) -> every worker
#   launch/tpu_vm.sh [--dry-run] run     NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   launch/tpu_vm.sh [--dry-run] logs    NAME ZONE       # follow worker 0's log
#   launch/tpu_vm.sh [--dry-run] stop    NAME ZONE       # SIGTERM: checkpoint the current step, exit
#   launch/tpu_vm.sh [--dry-run] delete  NAME ZONE       # tear the slice down
#
# `run` reuses the slice NAME (create it first, once); rerunning it with the same WORKDIR resumes
# from the last checkpoint. CONFIG: a recipe file under configs/ or a recipe by name
# (`pretrain:model=ViT-B_16`). WORKDIR should be a gs:// path every worker can write. JAX finds its
# peers through the TPU metadata (jax.distributed.initialize() without arguments).
# --dry-run (first argument) prints the commands, one per line, shell-quoted, and runs nothing.
# Every argument is checked against a strict pattern before anything runs (`;`, `$`, backticks,
# quotes, spaces and newlines are refused) and each word is quoted again before it reaches the
# remote shell, so no command is built from unchecked text.
#
# Multi-slice (several slices over DCN): create the queued resource with --node-count=N
# (NUM_SLICES) instead; the TPU runtime sets MEGASCALE_* on every worker, vit_jax.main detects it,
# and --config.mesh.dcn_data=N keeps only the outer data axis on the slow links.
set -euo pipefail

dry_run=0
if [[ ${1:-} == --dry-run ]]; then
  dry_run=1
  shift
fi

usage() {
  sed -n '5,10p' "$0" >&2
  exit 2
}

check() { # check NAME VALUE REGEX: refuses anything outside the pattern, before anything runs.
  if ! [[ $2 =~ $3 ]]; then
    printf 'error: invalid %s: %q (allowed: %s)\n' "$1" "$2" "$3" >&2
    exit 2
  fi
}

do_run() { # Prints the command (dry run) or runs it.
  if ((dry_run)); then
    local line
    line=$(printf '%q ' "$@")
    printf '%s\n' "${line% }"
  else
    "$@"
  fi
}

[[ $# -ge 3 ]] || usage
action=$1 tpu=$2 zone=$3
shift 3
check 'action' "$action" '^(create|install|run|logs|stop|delete)$'
check 'TPU name' "$tpu" '^[a-z][a-z0-9-]{0,61}$'
check 'zone' "$zone" '^[a-z]+-[a-z]+[0-9]+-[a-z]$'
remote_dir=${REMOTE_DIR:-vit_jax}
check 'REMOTE_DIR' "$remote_dir" '^[A-Za-z0-9_][A-Za-z0-9_./-]*$'
ssh_all=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone" --worker=all)
log="$remote_dir/run.log"

case $action in
  create)
    [[ $# -ge 1 && $# -le 2 ]] || usage
    accelerator=$1
    check 'accelerator type' "$accelerator" '^v[0-9a-z]+-[0-9]+$'
    spot=()
    if [[ $# -eq 2 ]]; then
      check 'option' "$2" '^--spot$'
      spot=(--spot)
    fi
    version=${TPU_RUNTIME:-tpu-ubuntu2204-base}
    check 'TPU_RUNTIME' "$version" '^[a-z0-9.-]+$'
    do_run gcloud compute tpus queued-resources create "$tpu" "--node-id=$tpu" "--zone=$zone" \
      "--accelerator-type=$accelerator" "--runtime-version=$version" "${spot[@]}"
    # Queued: polled until ACTIVE (spot capacity can take a while).
    describe=(gcloud compute tpus queued-resources describe "$tpu" "--zone=$zone"
      '--format=value(state.state)')
    do_run "${describe[@]}"
    if ((!dry_run)); then
      until [[ $("${describe[@]}") == ACTIVE ]]; do sleep 30; done
    fi
    ;;
  install)
    [[ $# -eq 0 ]] || usage
    tarball=${TMPDIR:-/tmp}/vit_jax-src.tar.gz
    check 'TMPDIR' "$tarball" '^[A-Za-z0-9_./-]+$'
    do_run git archive --format=tar.gz -o "$tarball" HEAD
    do_run gcloud compute tpus tpu-vm scp "$tarball" "$tpu:vit_jax-src.tar.gz" "--zone=$zone" \
      --worker=all
    q=$(printf '%q' "$remote_dir")
    do_run "${ssh_all[@]}" "--command=mkdir -p $q && tar -xzf vit_jax-src.tar.gz -C $q && cd $q \
&& python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]'"
    ;;
  run)
    [[ $# -ge 2 ]] || usage
    config=$1 workdir=$2
    shift 2
    check 'config' "$config" '^(configs/[A-Za-z0-9_]+\.py|[a-z][a-z0-9_]*)(:[A-Za-z0-9_=,./+-]*)?$'
    check 'workdir' "$workdir" '^(gs://)?[A-Za-z0-9_][A-Za-z0-9_./-]*$'
    for arg in "$@"; do
      # Values may hold preprocessing strings: `|`, `(`, `)` and `,` are fine once quoted.
      check 'override' "$arg" '^--config\.[A-Za-z0-9_.]+=[A-Za-z0-9_=,./:+|()@%-]*$'
    done
    args=(.venv/bin/python -m vit_jax.main "--config=$config" "--workdir=$workdir" "$@")
    quoted=$(printf '%q ' "${args[@]}")
    q=$(printf '%q' "$remote_dir")
    # Detached from the ssh session (a dropped connection must not kill the run); pid kept for stop.
    do_run "${ssh_all[@]}" "--command=cd $q && (setsid nohup ${quoted% } >> run.log 2>&1 \
< /dev/null & echo \$! > run.pid)"
    do_run gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone" --worker=0 \
      "--command=tail -n +1 -F $(printf '%q' "$log")"
    ;;
  logs)
    [[ $# -eq 0 ]] || usage
    do_run gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone" --worker=0 \
      "--command=tail -n 100 -F $(printf '%q' "$log")"
    ;;
  stop)
    [[ $# -eq 0 ]] || usage
    q=$(printf '%q' "$remote_dir")
    do_run "${ssh_all[@]}" "--command=kill -TERM \$(cat $q/run.pid)"
    ;;
  delete)
    [[ $# -eq 0 ]] || usage
    do_run gcloud compute tpus queued-resources delete "$tpu" "--zone=$zone" --force --quiet
    ;;
esac
