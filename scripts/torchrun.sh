#!/usr/bin/env bash
# Launch any entry point on one node or several with torchrun:
#   scripts/torchrun.sh main_pretrain.py --model mae_vit_base_patch16 ... --output_dir /shared/OUT
# One node: NPROC (default: the GPUs visible) processes. Several nodes: run the same line on every node with
# NNODES=N and HEAD=<host of node 0>; torchrun's c10d rendezvous assigns the ranks (RDZV_ID, default
# milan, must differ between concurrent jobs; PORT defaults to 29400).
set -euo pipefail
cd "$(dirname "$0")/.."
script=$1
shift
nproc=${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
nnodes=${NNODES:-1}
if [ "$nnodes" -gt 1 ]; then
  rdzv=(--nnodes="$nnodes" --rdzv_backend=c10d --rdzv_endpoint="${HEAD:?set HEAD to the host of node 0}:${PORT:-29400}"
        --rdzv_id="${RDZV_ID:-milan}")
else
  rdzv=(--standalone --nnodes=1)
fi
exec python -m torch.distributed.run "${rdzv[@]}" --nproc_per_node="$nproc" "$script" "$@"
