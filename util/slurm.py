"""SLURM submission with submitit, shared by the submitit_*.py scripts: one task per GPU, the process group
set up from SLURM's variables, and requeue when a job is preempted or reaches its time limit. Requeued
jobs resume from the newest checkpoint in --output_dir (mid-epoch if the run saved on the signal)."""
import os
import subprocess

from util import cli
from util.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_slurm_args(parser):
    g = parser.add_argument_group('SLURM (submitit)')
    g.add_argument('--ngpus', type=int, default=8, help='GPUs (tasks) per node')
    g.add_argument('--nodes', type=int, default=1, help='nodes of the job')
    g.add_argument('--timeout', type=int, default=4320, help='job time limit in minutes')
    g.add_argument('--job_dir', default='', help='submitit logs (default: OUTPUT_DIR/submitit)')
    g.add_argument('--partition', default='', help='SLURM partition')
    g.add_argument('--account', default='', help='SLURM account to charge')
    g.add_argument('--qos', default='', help='SLURM quality of service')
    g.add_argument('--constraint', default='', help='e.g. a GPU type')
    g.add_argument('--cpus_per_task', type=int, default=10, help='CPUs per task (the loader workers need them)')
    g.add_argument('--mem_per_gpu', type=int, default=60, help='GiB of host memory per GPU')
    g.add_argument('--cluster', default=None, choices=['slurm', 'local', 'debug'],
                   help='submitit executor; default: SLURM where sbatch exists, else local processes')
    return parser


class Trainer:
    """The submitted callable: sets the torch.distributed variables from the job, runs the entry point, and
    requeues the job when the run stopped on a signal (it saved a checkpoint first)."""

    def __init__(self, main, args):
        self.main, self.args = main, args

    def __call__(self):
        import submitit
        env = submitit.JobEnvironment()
        os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks),
                          LOCAL_RANK=str(env.local_rank), MASTER_ADDR=env.hostnames[0],
                          MASTER_PORT=str(20000 + int(''.join(filter(str.isdigit, str(env.job_id))) or 0) % 20000))
        result = cli.run(self.main, self.args, exit_when_stopped=False) or {}
        if not result.get('completed', True) and env.global_rank == 0 and os.environ.get('SLURM_JOB_ID'):
            subprocess.check_call(['scontrol', 'requeue', os.environ['SLURM_JOB_ID']], timeout=60)
        return result

    def checkpoint(self):
        """submitit's time-limit/preemption hook (before our own signal handling is installed): requeue; the
        new job resumes from the newest checkpoint."""
        import submitit
        return submitit.helpers.DelayedSubmission(Trainer(self.main, self.args))


def submit(module, name, argv=None):
    """Parse the entry point's flags plus the SLURM ones and submit `module.main`; returns the job."""
    try:
        import submitit
    except ImportError:
        raise UserError('SLURM submission needs submitit: pip install submitit') from None
    parser = add_slurm_args(module.get_args_parser())
    args = cli.parse_args(parser, module.DEMO_DEFAULTS, argv)
    module.validate_args(args)  # here, not after the job has waited in the queue
    args.output_dir = os.path.abspath(args.output_dir)  # requeued jobs must find the same checkpoints
    args.log_dir = os.path.abspath(args.log_dir)
    args.dist_url = 'env://'
    job_dir = args.job_dir or os.path.join(args.output_dir, 'submitit')
    executor = submitit.AutoExecutor(folder=job_dir, cluster=args.cluster, slurm_max_num_timeout=30)
    params = dict(name=name, timeout_min=args.timeout, nodes=args.nodes, tasks_per_node=args.ngpus,
                  cpus_per_task=args.cpus_per_task)
    if executor.cluster == 'slurm':
        extra = {k: v for k, v in (('account', args.account), ('qos', args.qos), ('constraint', args.constraint))
                 if v}
        params.update(gpus_per_node=args.ngpus, mem_gb=args.mem_per_gpu * args.ngpus, slurm_signal_delay_s=120,
                      slurm_partition=args.partition or None, slurm_additional_parameters=extra)
    elif executor.cluster == 'local':
        params.update(gpus_per_node=args.ngpus if args.device == 'cuda' else 0)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    # the job unpickles the entry point's main: make this repository importable wherever it runs from
    os.environ['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH')) if p)
    job = executor.submit(Trainer(module.main, args))
    print(f'submitted job {job.job_id}; logs in {job_dir}, checkpoints in {args.output_dir}', flush=True)
    return job
