"""Submit main_linprobe.py to SLURM with submitit (one task per GPU, requeued on preemption); every flag of
main_linprobe.py applies, plus the SLURM ones (--ngpus --nodes --timeout --partition ...)."""
import main_linprobe
from util import cli, slurm

if __name__ == '__main__':
    cli.run(lambda argv: slurm.submit(main_linprobe, 'milan_linprobe', argv), None)
