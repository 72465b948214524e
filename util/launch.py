"""What started this process, read from the environment alone: torch-free, so that the stop-signal handler
(util.preemption) can be installed before the slow imports of torch."""
import os


def launcher():
    """What started this process as one of several: 'torchrun' (RANK and WORLD_SIZE, as torchrun,
    `torch.distributed.launch --use_env` and submitit set them), 'srun' (SLURM tasks without a launcher), or None."""
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        return 'torchrun'
    if int(os.environ.get('SLURM_NTASKS', 1)) > 1 and 'SLURM_PROCID' in os.environ:
        return 'srun'
    return None


def env_rank():
    """The launcher's rank for this process (torchrun's RANK, srun's SLURM_PROCID), 0 for a plain process: the
    process group's rank once it exists."""
    started_by = launcher()
    if started_by == 'torchrun':
        return int(os.environ['RANK'])
    return int(os.environ['SLURM_PROCID']) if started_by == 'srun' else 0
