"""One long-lived thread for all of a host's torch work (the app runs every model step here).

Why one thread: torch's CPU build uses GNU libgomp, which keeps an OpenMP thread team for each
thread that has run parallel torch work, for as long as that thread lives. Once two such
threads exist there are more OpenMP threads than cores, and libgomp stops spinning between
parallel regions: the small matrix products of one-token decoding then pay a wake-up each and
run about half as fast (docs/BENCHMARKS.md, "Threads"). A web server's handler pool is
exactly that: persistent threads, each of which may run a model step. Sending every step
through one ``ModelThread`` keeps one team.

``call`` runs a function there and returns its result (or raises its exception) in the
caller's thread; ``submit`` returns a ``Future``. The caller's ``contextvars`` travel with the
call (gradio finds an event's progress bar through them). Calls from the model thread itself
run inline, so nested use cannot deadlock. After a fork (a ``multiprocessing`` worker, say)
the thread is started afresh in the child.
"""

from __future__ import annotations

import contextvars
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


class ModelThread:
    """Runs callables one at a time, in submission order, in one long-lived thread.

    Args:
        name: the thread's name (shown in stack dumps and profilers).
    """

    def __init__(self, name: str = "hsr-model") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pid = -1
        self._ident: int | None = None

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None or self._pid != os.getpid():
                # a fork copies the executor but not its thread: start a new one in the child
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=self.name, initializer=self._started
                )
                self._pid = os.getpid()
                self._ident = None
            return self._executor

    def _started(self) -> None:
        self._ident = threading.get_ident()

    def on_thread(self) -> bool:
        """Whether the caller is the model thread itself."""
        return self._ident is not None and threading.get_ident() == self._ident

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Queue ``fn(*args, **kwargs)`` for the model thread (run inline when called there)."""
        if self.on_thread() and self._pid == os.getpid():
            done: Future[T] = Future()
            try:
                done.set_result(fn(*args, **kwargs))
            except BaseException as e:
                done.set_exception(e)
            return done
        ctx = contextvars.copy_context()
        return self._pool().submit(ctx.run, fn, *args, **kwargs)

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in the model thread and return its result."""
        return self.submit(fn, *args, **kwargs).result()

    def ident(self) -> int:
        """The model thread's ``threading.get_ident()`` (starts the thread if needed)."""
        self.call(lambda: None)
        assert self._ident is not None
        return self._ident

    def shutdown(self) -> None:
        """Let the thread end once its queue is done (a later call starts a new one)."""
        with self._lock:
            executor, self._executor, self._ident = self._executor, None, None
        if executor is not None:
            executor.shutdown(wait=True)


@contextmanager
def torch_threads(count: int, device: Any = None) -> Iterator[None]:
    """Run the body with ``count`` torch threads when ``device`` is the CPU (or None), then
    restore the previous count; on other devices it does nothing.

    Many small tensor operations (the Realign tab's live view) lose more to thread hand-offs
    than they gain from threads; see ``bench/bench_realign_live.py --threads``.
    """
    import torch

    if getattr(device, "type", "cpu") != "cpu" or torch.get_num_threads() == count:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
