"""Preemption: SIGTERM and SIGUSR1 (what SLURM and most schedulers send before killing a job), and SIGUSR2
(submitit's time-limit signal) ask the run to stop at the next step boundary with a checkpoint, instead
of dying mid-step."""
import signal

from util.logger import log

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopRequest:
    """A flag set by the signal handler and read by the training loop."""

    def __init__(self):
        self.requested = False

    def install(self):
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if not self.requested:
            log(f'received {signal.Signals(signum).name}: saving a checkpoint at the next step, then exiting')
        self.requested = True
