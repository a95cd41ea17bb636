"""The model thread: one long-lived thread, results and errors back to the caller, context
variables along, nested calls inline, a fresh thread after a fork."""

from __future__ import annotations

import contextvars
import multiprocessing
import threading

import pytest

from hsr_core.worker import ModelThread

WHO = contextvars.ContextVar("who", default="nobody")


def test_calls_run_in_one_thread_in_order() -> None:
    mt = ModelThread()
    try:
        seen = [mt.call(threading.get_ident) for _ in range(5)]
        assert len(set(seen)) == 1 and seen[0] != threading.get_ident() == threading.get_ident()
        order: list[int] = []
        futures = [mt.submit(order.append, i) for i in range(50)]
        for f in futures:
            f.result()
        assert order == list(range(50))
        assert mt.ident() == seen[0]
    finally:
        mt.shutdown()


def test_results_errors_and_context_come_back() -> None:
    mt = ModelThread()
    try:
        assert mt.call(lambda a, b=0: a + b, 2, b=3) == 5
        with pytest.raises(ZeroDivisionError):
            mt.call(lambda: 1 / 0)
        assert mt.call(lambda: 7) == 7  # an error does not end the thread
        token = WHO.set("caller")
        try:
            assert mt.call(WHO.get) == "caller"
        finally:
            WHO.reset(token)
        assert mt.call(WHO.get) == "nobody"
    finally:
        mt.shutdown()


def test_nested_calls_run_inline() -> None:
    mt = ModelThread()
    try:
        outer = mt.call(lambda: (threading.get_ident(), mt.call(threading.get_ident)))
        assert outer[0] == outer[1]
        with pytest.raises(KeyError):
            mt.call(lambda: mt.call(lambda: {}["missing"]))
    finally:
        mt.shutdown()


def test_a_new_thread_after_shutdown() -> None:
    mt = ModelThread()
    first = mt.ident()
    mt.shutdown()
    try:
        assert not any(t.ident == first for t in threading.enumerate())
        assert mt.call(lambda: 1) == 1
    finally:
        mt.shutdown()


_FORKED = ModelThread()


def _in_child(q) -> None:
    q.put(_FORKED.call(lambda: threading.current_thread().name))


def test_a_forked_child_gets_its_own_thread() -> None:
    _FORKED.call(lambda: None)  # started in the parent
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_in_child, args=(q,))
    p.start()
    try:
        assert q.get(timeout=30).startswith("hsr-model")
    finally:
        p.join(30)
        _FORKED.shutdown()
    assert p.exitcode == 0
