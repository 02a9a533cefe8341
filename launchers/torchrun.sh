#!/usr/bin/env bash
# Launch `mtp-rl train` with torchrun on this node (all its GPUs by default).
#
#   launchers/torchrun.sh [--dry-run] [--nproc N] [--] [mtp-rl train flags ...]
#
#   launchers/torchrun.sh --config examples/recipes/mimo_7b_dapo_occ.yaml --sglang-mem-fraction-static 0.15
#   launchers/torchrun.sh --dry-run --config examples/recipes/mimo_7b_dapo_occ.yaml   # print, do not run
#
# Environment:
#   NPROC_PER_NODE  processes (default: the number of GPUs nvidia-smi lists, else 1)
#   NNODES          nodes (default 1: torchrun --standalone). For a hand-made multi-node launch
#   NODE_RANK       without Slurm, run this on every node with the same NNODES, MASTER_ADDR and
#   MASTER_ADDR     MASTER_PORT and its own NODE_RANK (c10d rendezvous at MASTER_ADDR:MASTER_PORT).
#   MASTER_PORT     default 29500
#   TORCHRUN        the torchrun command (default: torchrun)
#   LOG_DIR         where this node's log goes (default runs/logs); the command is printed there first
# --dry-run prints the full command and exits without running it.
set -euo pipefail

print_cmd() { printf '%q' "$1"; shift; (($# == 0)) || printf ' %q' "$@"; printf '\n'; }

dry_run=0
nproc="${NPROC_PER_NODE:-}"
args=()
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --nproc) nproc="$2"; shift ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1") ;;
  esac
  shift
done

if [[ -z "$nproc" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    nproc="$(nvidia-smi --list-gpus | wc -l)"
  fi
  [[ -n "$nproc" && "$nproc" -gt 0 ]] || nproc=1
fi

nnodes="${NNODES:-1}"
port="${MASTER_PORT:-29500}"
read -r -a torchrun_cmd <<<"${TORCHRUN:-torchrun}"
cmd=("${torchrun_cmd[@]}" --nproc-per-node "$nproc")
if [[ "$nnodes" -eq 1 ]]; then
  cmd+=(--standalone)
else
  : "${MASTER_ADDR:?set MASTER_ADDR (the rendezvous host) for NNODES > 1}"
  : "${NODE_RANK:?set NODE_RANK (0..NNODES-1) for NNODES > 1}"
  cmd+=(--nnodes "$nnodes" --node-rank "$NODE_RANK" --rdzv-backend c10d
    --rdzv-endpoint "$MASTER_ADDR:$port" --rdzv-id "${RDZV_ID:-mtp-rl}")
fi
cmd+=(-m megatron_mtp_rl.train "${args[@]}")

if ((dry_run)); then
  print_cmd "${cmd[@]}"
  exit 0
fi

log_dir="${LOG_DIR:-runs/logs}"
mkdir -p "$log_dir"
log="$log_dir/torchrun-node${NODE_RANK:-0}.log"
print_cmd "${cmd[@]}" >"$log"
exec "${cmd[@]}" > >(tee -a "$log") 2>&1
