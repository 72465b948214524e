"""Launched by tests/test_distributed.py with torchrun (2 processes, gloo): start-up waits that outlast the
process group's own timeout. The group is made with a 2 s timeout (NCCL's 10 minutes, scaled down); the main
process then spends 5 s inside util.distributed.main_first (a first teacher download), the other one 5 s inside
in_turn (its share of a shard index), and both still meet for a training collective afterwards. The start-up
waits' own limit, util.distributed.START_UP_TIMEOUT, is the first argument in seconds: 10 lets them wait, 3 ends
the run with our line.

    python -m torch.distributed.run --nproc_per_node 2 tests/wait_probe.py SECONDS
"""
import argparse
import datetime
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from util import distributed as udist  # noqa: E402
from util.errors import UserError  # noqa: E402

SHORT = datetime.timedelta(seconds=2)
_init = dist.init_process_group


def init_with_short_timeout(*args, **kwargs):
    return _init(*args, **{**kwargs, 'timeout': SHORT})


dist.init_process_group = init_with_short_timeout
udist.START_UP_TIMEOUT = datetime.timedelta(seconds=float(sys.argv[1]))


def run_start_up():
    with udist.main_first():
        if udist.is_main():
            time.sleep(5)
    with udist.in_turn():
        if not udist.is_main():
            time.sleep(5)


args = argparse.Namespace(device='cpu', local_rank=0, dist_url='env://')
udist.init_distributed(args)
try:
    run_start_up()
except UserError as e:
    print(f'rank {args.rank}: error: {e}')
    sys.exit(2)

total = torch.ones(1)
dist.all_reduce(total)
print(f'rank {args.rank}: waited past the group\'s {SHORT.seconds} s timeout; all_reduce gives {total.item():.0f}')
udist.cleanup()
