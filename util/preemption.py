"""Stop signals: SIGTERM and SIGUSR1 (what SLURM and most schedulers send before killing a job), SIGUSR2
(submitit's time-limit signal) and SIGINT (Ctrl-C) ask the run to stop at its next check with a checkpoint,
instead of dying mid-step. A second Ctrl-C quits at once, without saving. DataLoader workers ignore them all:
the main process alone decides when to stop, and a worker killed by the terminal's or the scheduler's signal
to the whole process group would take the run down before it could save."""
import signal

from util.logger import log

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


class StopRequest:
    """The first stop signal received, set by the handler and read by the training loop."""

    def __init__(self):
        self.signal = None

    @property
    def requested(self):
        return self.signal is not None

    def install(self):
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the checkpoint
        if self.signal is None:
            again = '; press Ctrl-C again to quit without saving' if signum == signal.SIGINT else ''
            log(f'received {signal.Signals(signum).name}: saving a checkpoint at the next check, then exiting{again}')
            self.signal = signum


# One per process: installed before anything is built (util.cli.run), read by every epoch.
STOP = StopRequest()


def ignore_stop_signals():
    """For DataLoader workers (worker_init_fn)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
