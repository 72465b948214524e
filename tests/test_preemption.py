"""util/preemption.py: the stop-signal handlers are installed and given back per run."""
import signal

import pytest

import main_finetune
from util import cli, runtime
from util.preemption import STOP


def test_stop_handlers_are_per_run(tmp_path):
    """A training run takes the stop signals and gives them back; the run's install after the entry point's early
    one keeps a request that came in between, a later run forgets it (given back or not: main() called twice
    in a notebook); an evaluation-only run leaves Ctrl-C alone (it never checks for a stop)."""
    before = signal.getsignal(signal.SIGINT)
    STOP.install(early=True)
    STOP._handle(signal.SIGTERM, None)
    assert STOP.requested
    STOP.install()
    assert STOP.requested and signal.getsignal(signal.SIGTERM) == STOP._handle
    STOP.install()  # the next run in this process, the handlers never given back
    assert not STOP.requested
    STOP._handle(signal.SIGTERM, None)
    STOP.uninstall()
    assert STOP.signal == signal.SIGTERM  # still readable after the run (util.cli.run's exit status)
    STOP.install()
    assert not STOP.requested and signal.getsignal(signal.SIGTERM) == STOP._handle
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C after any stop request quits at once
        STOP._handle(signal.SIGTERM, None) or STOP._handle(signal.SIGINT, None)
    STOP.uninstall()
    assert signal.getsignal(signal.SIGINT) == before
    args = cli.parse_args(main_finetune.get_args_parser(), main_finetune.DEMO_DEFAULTS,
                          ['--eval', '--resume', __file__, '--output_dir', str(tmp_path)])
    runtime.start(args)
    assert signal.getsignal(signal.SIGINT) == before
    STOP.install(early=True)  # the entry point's: an evaluation gives the signals back
    runtime.start(args)
    assert signal.getsignal(signal.SIGINT) == before and signal.getsignal(signal.SIGTERM) != STOP._handle
