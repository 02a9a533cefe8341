#!/usr/bin/env bash
# Submit `mtp-rl train --ray` to a running Ray cluster with `ray job submit`: the job's driver joins
# the cluster (RAY_ADDRESS is set for it) and places one trainer actor per GPU plus the rollout
# actor in a placement group (megatron_mtp_rl/cluster/ray_launch.py).
#
#   launchers/ray_submit.sh [--dry-run] [--address URL] [--nodes N] [--working-dir DIR] [--] [train flags ...]
#
#   launchers/ray_submit.sh --address http://head:8265 --nodes 2 -- --config examples/recipes/tiny.yaml
#
# Environment:
#   RAY_ADDRESS        the cluster's dashboard/job address (default http://127.0.0.1:8265; --address wins)
#   GPUS_PER_NODE      trainer actors per node (default 8): --ray-num-trainers = nodes × this
#   GPUS_PER_TRAINER   1 on GPU clusters, 0 for a CPU cluster (default 1)
#   RAY                the ray command (default: ray)
# Without --working-dir the cluster must have this package installed (e.g. the Docker image);
# with it, Ray uploads DIR and installs nothing (use a runtime env with pip for that).
# --dry-run prints the full command and exits.
set -euo pipefail

print_cmd() { printf '%q' "$1"; shift; (($# == 0)) || printf ' %q' "$@"; printf '\n'; }

dry_run=0
address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
nodes=1
working_dir=""
args=()
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --address) address="$2"; shift ;;
    --nodes) nodes="$2"; shift ;;
    --working-dir) working_dir="$2"; shift ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1") ;;
  esac
  shift
done

gpus_per_node="${GPUS_PER_NODE:-8}"
gpus_per_trainer="${GPUS_PER_TRAINER:-1}"
trainers=$((nodes * gpus_per_node))
read -r -a ray_cmd <<<"${RAY:-ray}"
cmd=("${ray_cmd[@]}" job submit --address "$address")
[[ -z "$working_dir" ]] || cmd+=(--working-dir "$working_dir")
cmd+=(-- python -m megatron_mtp_rl.train --ray --ray-num-trainers "$trainers"
  --ray-gpus-per-trainer "$gpus_per_trainer" "${args[@]}")

if ((dry_run)); then
  print_cmd "${cmd[@]}"
  exit 0
fi
exec "${cmd[@]}"
