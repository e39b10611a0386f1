"""utils.power: the timer slack of a thread and of the threads it starts; the app's server threads get the configured
slack. The slack is read back independently of the code under test, from ``/proc/<tid>/timerslack_ns``."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import serve_app
from utils.power import set_timer_slack, timer_slack, timer_slack_for_new_threads

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the timer slack is a Linux feature")


def slack_ns(tid: int | None = None) -> int:
    """A thread's timer slack as the kernel reports it (the calling thread's when ``tid`` is None)."""
    return int(Path(f"/proc/{tid or threading.get_native_id()}/timerslack_ns").read_text())


def in_new_thread(fn):
    """``fn()``'s result, run in a new thread (so this thread's slack is never touched)."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()))
    thread.start()
    thread.join()
    return result["value"]


def test_set_timer_slack_sets_the_calling_thread_and_the_threads_it_starts_inherit_it():
    def body():
        before_start = in_new_thread(slack_ns)
        assert set_timer_slack(0.0123) is True
        return slack_ns(), timer_slack(), in_new_thread(slack_ns), in_new_thread(timer_slack), before_start

    own, reported, child, child_reported, child_before = in_new_thread(body)
    assert own == child == 12_300_000
    assert reported == child_reported == pytest.approx(0.0123)
    assert child_before != 12_300_000
    assert slack_ns() == child_before  # this thread was not touched


def test_slack_for_new_threads_is_restored_in_the_caller_and_kept_by_its_threads():
    def body():
        set_timer_slack(0.0007)  # a value that is not the default, so a reset to the default would show
        with timer_slack_for_new_threads(0.03) as applied:
            inside = slack_ns()
            child = in_new_thread(slack_ns)
        return applied, inside, child, slack_ns()

    applied, inside, child, after = in_new_thread(body)
    assert applied is True
    assert inside == child == 30_000_000
    assert after == 700_000


def test_zero_leaves_the_slack_as_it_is():
    def body():
        set_timer_slack(0.0007)
        with timer_slack_for_new_threads(0) as applied:
            return applied, slack_ns(), in_new_thread(slack_ns)

    assert in_new_thread(body) == (False, 700_000, 700_000)


def test_negative_slack_is_refused():
    with pytest.raises(ValueError, match="0 or more"):
        set_timer_slack(-0.001)
    from config import Config

    with pytest.raises(ValueError, match="idle_timer_slack_ms must be 0 or more"):
        Config.from_env(env={"REALESRGAN_IDLE_TIMER_SLACK_MS": "-5"}, dotenv_path=None)
    assert Config.from_env(env={"REALESRGAN_IDLE_TIMER_SLACK_MS": "0"}, dotenv_path=None).idle_timer_slack_ms == 0


@pytest.mark.parametrize("slack_ms", [30, 0])
def test_the_app_server_threads_get_the_configured_slack(tmp_path, shared_weights_dir, slack_ms):
    main_before = slack_ns()
    existing = {t.native_id for t in threading.enumerate()}
    with serve_app(tmp_path, shared_weights_dir, idle_timer_slack_ms=slack_ms) as (url, _services):
        import httpx

        assert httpx.get(url, timeout=30).status_code == 200  # the event loop serves a request (in worker threads)
        started = [t for t in threading.enumerate() if t.native_id not in existing]
        slacks = {}
        for thread in started:
            try:
                slacks[thread.name] = slack_ns(thread.native_id)
            except FileNotFoundError:  # a short-lived thread that has ended meanwhile
                pass
        main_during = slack_ns()
    assert slacks, "starting the app started no thread"
    expected = slack_ms * 1_000_000 if slack_ms else main_before
    assert slacks == {name: expected for name in slacks}  # the server thread and every thread it started
    assert main_during == main_before  # the caller's own slack is back
