"""Stop signals: SIGTERM and SIGUSR1 (what SLURM and most schedulers send before killing a job), SIGUSR2
(submitit's time-limit signal) and SIGINT (Ctrl-C) ask a training run to stop at its next check with a
checkpoint, instead of dying mid-step. After that, Ctrl-C quits at once, without saving.

DataLoader workers ignore them all: the training process alone decides when to stop, and a worker killed by
the terminal's or the scheduler's signal to the whole process group would take the run down before it could
save. Ignoring SIGTERM also defeats the DataLoader's last resort for a stuck worker (it terminates it and
Python's exit then waits for it), so workers still alive when the training process exits are killed.

The entry points install the handlers before they import torch (`STOP.install()` under `__main__`, first
thing): a stop signal during the seconds of imports then ends the run with a line instead of silently. This
module therefore imports nothing heavy."""
import atexit
import multiprocessing
import os
import signal
import time

from util.launch import env_rank

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


class StopRequest:
    """The first stop signal received, set by the handler and read by the training loop."""

    def __init__(self):
        self.signal = None
        self._previous = None
        self._early = False  # installed by the entry point, before the run's own install

    @property
    def requested(self):
        return self.signal is not None

    @property
    def installed(self):
        return self._previous is not None

    def install(self, early=False):
        """Handle the stop signals from now on, forgetting a request of an earlier run in this process. The run's
        install after the entry point's `early` one keeps a request that arrived in between (during imports)."""
        if self._previous is None:
            self._previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
            for sig in SIGNALS:
                signal.signal(sig, self._handle)
            self.signal = None
        elif not self._early:  # an earlier run called without util.cli.run left them installed
            self.signal = None
        self._early = early
        return self

    def uninstall(self):
        """Give the signals back to their earlier handlers (tests and notebooks run several runs in a process); the
        request stays readable until the next install."""
        if self._previous is not None:
            for sig, handler in self._previous.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)
            self._previous = None

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt  # Ctrl-C after a stop request: the user does not want to wait for the save
        if self.signal is None:
            self.signal = signum
            if env_rank() == 0:  # os.write: print() here could re-enter a write the signal interrupted
                again = '; press Ctrl-C again to quit without saving' if signum == signal.SIGINT else ''
                os.write(1, f'{time.strftime("%H:%M:%S")} received {signal.Signals(signum).name}: saving a '
                            f'checkpoint at the next check, then exiting{again}\n'.encode())


# One per process: installed by the entry point and when a training run starts (util.runtime.start), read by
# every epoch.
STOP = StopRequest()


def ignore_stop_signals():
    """For DataLoader workers (worker_init_fn)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _kill_remaining_children():
    """At exit: the DataLoader has shut down the workers it could; kill those it could not (stuck), which
    ignore the SIGTERM that multiprocessing's own exit handler would send before waiting for them forever."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


atexit.register(_kill_remaining_children)  # after multiprocessing's own handler, so it runs before it
