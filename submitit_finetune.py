"""Submit main_finetune.py to SLURM with submitit (one task per GPU, requeued on preemption); every flag of
main_finetune.py applies, plus the SLURM ones (--ngpus --nodes --timeout --partition ...)."""
import main_finetune
from util import cli, slurm

if __name__ == '__main__':
    cli.run(lambda argv: slurm.submit(main_finetune, 'milan_finetune', argv), None)
