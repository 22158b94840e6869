"""The worker's garbage-collector pause: nested, concurrent, exception-safe."""

from __future__ import annotations

import gc
import threading

import pytest

from worker.gc_pause import paused_gc


def test_pause_restores_the_collector_after_nesting_and_errors() -> None:
    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer block still runs
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with paused_gc():
            raise RuntimeError("job failed")
    assert gc.isenabled()


def test_pause_keeps_a_disabled_collector_disabled() -> None:
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_concurrent_jobs_reenable_only_when_the_last_ends() -> None:
    first_in, second_in, release_first = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def first() -> None:
        with paused_gc():
            first_in.set()
            release_first.wait(10)
        seen["after_first"] = gc.isenabled()
        second_in.wait(10)

    t = threading.Thread(target=first)
    t.start()
    assert first_in.wait(10)
    with paused_gc():
        second_in.set()
        release_first.set()
        t.join(10)
        assert not gc.isenabled()  # the first job ended, this one still runs
    assert seen["after_first"] is False
    assert gc.isenabled()
