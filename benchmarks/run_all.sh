#!/usr/bin/env bash
# Every measurement behind the GPU table of benchmarks/README.md, in order (about 15 minutes on an H100):
#   bash benchmarks/run_all.sh 2>&1 | tee benchmarks-$(date +%F).md
# NUM_WORKERS (default 16) sets the loader workers; JPEGS=DIR reuses a folder of JPEGs instead of generating 5000.
set -euo pipefail
cd "$(dirname "$0")/.."
workers=${NUM_WORKERS:-16}
if [ -z "${JPEGS:-}" ]; then
    JPEGS=$(mktemp -d)
    trap 'rm -rf "$JPEGS"' EXIT
    python benchmarks/common.py "$JPEGS" 5000
fi
python benchmarks/bench_pretrain.py --models mae_vit_base_patch16 --batch_sizes 256 --precisions bf16 --compile on off
python benchmarks/bench_pretrain.py --models mae_vit_base_patch16 --batch_sizes 256 --precisions fp16 --compile on
python benchmarks/bench_pretrain.py --mode mae --models mae_vit_base_patch16 --batch_sizes 256 --compile on off
python benchmarks/bench_pretrain.py --models mae_vit_large_patch16 --batch_sizes 128
python benchmarks/bench_finetune.py --models vit_base_patch16 --batch_sizes 128 --compile on off
python benchmarks/bench_pretrain.py --loader --data_path "$JPEGS" --num_workers "$workers" --batch_sizes 256
python benchmarks/bench_pretrain.py --loader --gpu_decode --data_path "$JPEGS" --num_workers "$workers" --batch_sizes 256
python benchmarks/bench_pretrain.py --data jpeg --data_path "$JPEGS" --num_workers "$workers" --steps 50
python benchmarks/bench_pretrain.py --data jpeg --gpu_decode --data_path "$JPEGS" --num_workers "$workers" --steps 50
python benchmarks/bench_finetune.py --data jpeg --data_path "$JPEGS" --num_workers "$workers" --steps 50
