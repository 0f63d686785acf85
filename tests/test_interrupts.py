import signal
import time

import pytest

from jaxgen.experiments import interrupts


@pytest.fixture
def default_handlers():
    """Python's own handlers (SIGINT: KeyboardInterrupt; SIGTERM: end the process)
    during the test, whatever the test runner installed."""
    before = {s: signal.getsignal(s) for s in interrupts.SIGNALS}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for signum, handler in before.items():
        signal.signal(signum, handler)


def test_the_first_signal_is_only_recorded_until_a_safe_point_checks(default_handlers):
    with interrupts.handled():
        signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt here
        assert interrupts.received() == signal.SIGINT
        with pytest.raises(interrupts.Interrupted) as stop:
            interrupts.check()
    assert stop.value.status == 130 and isinstance(stop.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_sigterm_stops_with_143_and_a_second_signal_acts_at_once(default_handlers):
    calls = []
    with interrupts.handled(at_once=calls.append):
        interrupts.check()  # nothing received yet
        signal.raise_signal(signal.SIGTERM)
        assert calls == []
        signal.raise_signal(signal.SIGINT)
        assert calls == [signal.SIGINT]
        with pytest.raises(interrupts.Interrupted) as stop:
            interrupts.check()
    assert stop.value.status == 143  # the first signal decides


def test_without_at_once_a_second_sigint_is_the_usual_keyboard_interrupt(default_handlers):
    with interrupts.handled():
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt) as second:
            signal.raise_signal(signal.SIGINT)
        assert not isinstance(second.value, interrupts.Interrupted)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back


def test_pending_signals_count_and_an_inner_block_leaves_the_outer_in_force(default_handlers):
    calls = []
    with interrupts.handled(at_once=calls.append, pending=[signal.SIGTERM]):
        outer = signal.getsignal(signal.SIGINT)
        with interrupts.handled():  # a run inside a command: the command's handlers stay
            assert signal.getsignal(signal.SIGINT) is outer
        assert signal.getsignal(signal.SIGINT) is outer
        signal.raise_signal(signal.SIGINT)  # the second one, counting the pending
        assert calls == [signal.SIGINT]
        with pytest.raises(interrupts.Interrupted, match="SIGTERM"):
            interrupts.check()


def test_phases_are_marked_only_when_asked(tmp_path, monkeypatch):
    path = tmp_path / "phases"
    monkeypatch.delenv(interrupts.PHASES_ENV, raising=False)
    interrupts.phase("start")
    monkeypatch.setenv(interrupts.PHASES_ENV, str(path))
    before = time.monotonic()
    interrupts.phase("segment")
    interrupts.phase("write")
    after = time.monotonic()
    lines = [line.split() for line in path.read_text().splitlines()]
    assert [name for _, name in lines] == ["segment", "write"]
    assert before <= float(lines[0][0]) <= float(lines[1][0]) <= after  # one clock for all
