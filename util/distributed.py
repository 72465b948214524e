"""Process-group setup for a plain process, torchrun (env://) and `torch.distributed.launch --use_env`,
plus the few collectives the training loops need."""
import contextlib
import datetime
import os
import subprocess

import torch
import torch.distributed as dist

from util.errors import UserError
from util.launch import env_rank, launcher


def init_distributed(args):
    """Sets args.distributed, args.rank, args.world_size, args.local_rank and returns the torch device."""
    started_by = launcher()
    if started_by == 'torchrun':
        args.rank = int(os.environ['RANK'])
        args.world_size = int(os.environ['WORLD_SIZE'])
        args.local_rank = int(os.environ.get('LOCAL_RANK', args.local_rank))
    elif started_by == 'srun':
        _from_slurm(args)
    else:
        args.rank, args.world_size, args.local_rank = 0, 1, 0
    args.distributed = args.world_size > 1
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f'--device {args.device} is not a device; pass cpu or cuda') from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UserError('--device cuda was asked for but no CUDA GPU is visible; pass --device cpu')
        device = torch.device('cuda', args.local_rank)
        torch.cuda.set_device(device)
    if args.distributed:
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        dist.init_process_group(backend, init_method=args.dist_url, world_size=args.world_size, rank=args.rank,
                                device_id=device if device.type == 'cuda' else None)
        dist.barrier()
    return device


# NCCL's collectives give up after 10 minutes (its default timeout). The waits of start-up, while the main process
# downloads a teacher (OpenAI's ViT-L/14 is 890 MB) or the processes index a thousand shards on network storage,
# can take longer: main_first and in_turn meet in the process group's rendezvous store instead, which the launcher
# already connected (no new connections, so nothing more to configure on multi-node jobs), with this timeout.
# Training's collectives keep the backend's.
START_UP_TIMEOUT = datetime.timedelta(hours=2)
_waits = 0  # start-up waits so far: every process meets them in the same order


def _wait_for_all():
    """A barrier of all processes through the default group's store (torch's private accessor, present in every
    supported release; dist.barrier where it is missing)."""
    global _waits
    store_of = getattr(dist.distributed_c10d, '_get_default_store', None)
    if store_of is None:
        dist.barrier()
        return
    store, _waits = store_of(), _waits + 1
    key = f'milan/start_up/{_waits}'
    if store.add(key, 1) == dist.get_world_size():  # the last one to arrive lets everybody go
        store.set(key + '/all', '1')
    try:
        store.wait([key + '/all'], START_UP_TIMEOUT)
    except Exception as e:  # torch's DistStoreError: a process crashed or hung before it got here
        raise UserError(f'the other processes did not finish start-up within {START_UP_TIMEOUT} (this process waited '
                        f'at start-up step {_waits}: a teacher download or the shard index); see their output for '
                        f'why') from e


def is_main():
    return launch_rank() == 0


def _from_slurm(args):
    """`srun python main_*.py` without a launcher: one task per GPU, rendezvous at the first node."""
    args.rank = int(os.environ['SLURM_PROCID'])
    args.world_size = int(os.environ['SLURM_NTASKS'])
    args.local_rank = int(os.environ.get('SLURM_LOCALID', 0))
    if 'MASTER_ADDR' not in os.environ:
        nodes = subprocess.run(['scontrol', 'show', 'hostnames', os.environ['SLURM_JOB_NODELIST']],
                               capture_output=True, text=True, check=True).stdout.split()
        os.environ['MASTER_ADDR'] = nodes[0]
    os.environ.setdefault('MASTER_PORT', str(20000 + int(os.environ.get('SLURM_JOB_ID', 0)) % 20000))


def local_processes():
    """Training processes on this machine, as torchrun says (LOCAL_WORLD_SIZE); 1 otherwise."""
    return int(os.environ.get('LOCAL_WORLD_SIZE', 1))


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def launch_rank():
    """This process's rank, also before the process group exists: then the launcher's (torchrun's RANK, or
    srun's SLURM_PROCID), so that start-up lines and errors are printed once, not once per process."""
    return dist.get_rank() if dist.is_initialized() else env_rank()


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


@contextlib.contextmanager
def main_first():
    """The main process runs the block first, then the others: for work whose result the others then find
    cached (a shard index), instead of every process doing it at once."""
    if dist.is_initialized() and not is_main():
        _wait_for_all()
    try:
        yield
    finally:  # on an error too: the others then meet it themselves, rather than wait forever
        if dist.is_initialized() and is_main():
            _wait_for_all()


@contextlib.contextmanager
def in_turn():
    """Each process runs the block, then all wait for each other (also after an error, which the others then
    meet themselves rather than waiting forever): work split over the processes whose results all then read."""
    try:
        yield
    finally:
        if dist.is_initialized():
            _wait_for_all()


def all_reduce_mean(tensor):
    """Mean of a tensor over all processes (returned as a new tensor)."""
    tensor = tensor.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def all_reduce_sum(number):
    """Sum of a Python number over all processes."""
    if not dist.is_initialized():
        return number
    device = torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else 'cpu'
    t = torch.tensor(number, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def all_reduce_any(flags):
    """Element-wise OR of a boolean tensor over all processes, as a list of bools (one host sync)."""
    flags = flags.detach().to(torch.int32)
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [bool(f) for f in flags.tolist()]


def gather_strided(local: torch.Tensor, total: int) -> torch.Tensor:
    """Every process's rows [n_r, ...] of a dataset sharded as util.data.ShardSampler shards it (process r holds
    the items r, r + W, r + 2W, ...), put together in dataset order: [total, ...] on every process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    world = dist.get_world_size()
    per = -(-total // world)
    padded = local.new_zeros((per, *local.shape[1:]))
    padded[:len(local)] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.stack(gathered, dim=1).reshape(world * per, *local.shape[1:])[:total]


def union_of_sets(local):
    """The union of every process's set (small sets of picklable items: one all_gather_object)."""
    if not dist.is_initialized():
        return set(local)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(local))
    return set().union(*gathered)


def broadcast_buffers(module, src=0):
    """Give every process rank `src`'s buffers: a linear probe's BatchNorm running statistics, which each
    process updates from its own batches, so that all evaluate the model rank 0 saves."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src)


def cleanup():
    """End the process group. The barrier first lets the backend's threads finish releasing the last
    collectives' tensors: with gloo (torch 2.11 seen), a process group destroyed while one of its threads waits
    for the GIL to free a Python-made tensor (all_gather_object's) deadlocks the process at exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
