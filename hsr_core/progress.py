"""Progress bars and cooperative stopping for long steps.

The core reports progress through ``tqdm`` only (the app shows it with
``gr.Progress(track_tqdm=True)``) and never imports a UI library. Long loops call
``check_stop(should_stop)`` between units of work, and generation takes ``StopOnFlag`` as a
stopping criterion (read after every token), so a Stop button really stops them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

T = TypeVar("T")
StopFlag = Callable[[], bool] | None


class Cancelled(RuntimeError):
    """The user stopped the job; nothing it computed was kept."""


def check_stop(should_stop: StopFlag) -> None:
    """Raise ``Cancelled`` when the stop flag is set."""
    if should_stop is not None and should_stop():
        raise Cancelled("stopped by the user")


class StopOnFlag:
    """A stopping criterion of ``generate``: True (for every row) once a flag is set."""

    def __init__(self, flags: Sequence[StopFlag | threading.Event]) -> None:
        self.flags = flags

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        stop = any(
            (f.is_set() if isinstance(f, threading.Event) else f())
            for f in self.flags
            if f is not None
        )
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def bar(
    iterable: Iterable[T] | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    **kw: Any,
) -> Any:
    """A tqdm progress bar with the project's defaults."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True, leave=False, **kw)


def steps(
    items: Sequence[T], *, desc: str, unit: str = "it"
) -> Iterator[tuple[T, Callable[[float], None]]]:
    """Iterate ``items`` under one bar that also moves inside an item.

    Each item comes with ``advance(fraction)``: the part of that item done so far (0..1). The
    bar then stands at ``index + fraction`` (``1.25/8 prompt``), and at the next whole number
    once the item is done, so a slow first item shows progress (and gives an ETA) long before
    it ends.

    Yields:
        ``(item, advance)`` pairs, in order.
    """
    # the count with one decimal (tqdm prints a float count in full: 0.5925925925925926/128)
    fmt = "{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
    with bar(desc=desc, total=len(items), unit=unit, bar_format=fmt) as b:
        for i, item in enumerate(items):

            def advance(fraction: float, i: int = i) -> None:
                b.update(i + min(max(fraction, 0.0), 1.0) - b.n)

            yield item, advance
            b.update(i + 1 - b.n)
