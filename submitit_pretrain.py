"""Submit main_pretrain.py to SLURM with submitit (one task per GPU, requeued on preemption); every flag of
main_pretrain.py applies, plus the SLURM ones (--ngpus --nodes --timeout --partition ...)."""
import main_pretrain
from util import cli, slurm

if __name__ == '__main__':
    cli.run(lambda argv: slurm.submit(main_pretrain, 'milan_pretrain', argv), None)
