"""Launched by tests/test_main_classification.py and tests/test_main_knn.py under torchrun (2 processes, gloo):
runs an entry point in-process on every rank and writes what its main() returned, one JSON per rank.

    python -m torch.distributed.run --nproc_per_node 2 tests/eval_probe.py OUT_DIR finetune|linprobe|knn ARGS...

ARGS are the entry point's own flags (e.g. `--eval --resume CKPT ...`). The test makes the assertions.
One entry point per launch: a second run in the same processes (a second process group after the first was
destroyed) was seen to fail in gloo's connect, so each launch runs exactly one.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import main_finetune  # noqa: E402
import main_knn  # noqa: E402
import main_linprobe  # noqa: E402
from util.cli import parse_args  # noqa: E402

ENTRY = {'finetune': main_finetune, 'linprobe': main_linprobe, 'knn': main_knn}


def main():
    out, entry, argv = sys.argv[1], ENTRY[sys.argv[2]], sys.argv[3:]
    args = parse_args(entry.get_args_parser(), entry.DEMO_DEFAULTS, argv)
    stats = entry.main(args)  # destroys the process group at its end: rank and size come from args
    os.makedirs(out, exist_ok=True)
    record = {'rank': args.rank, 'world_size': args.world_size, 'distributed': args.distributed, 'stats': stats}
    with open(os.path.join(out, f'rank{args.rank}.json'), 'w') as f:
        json.dump(record, f)


if __name__ == '__main__':
    main()
