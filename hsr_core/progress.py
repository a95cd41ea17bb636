"""Progress bars and cooperative stopping for long steps.

The core reports progress through ``tqdm`` only (the app shows it with
``gr.Progress(track_tqdm=True)``) and never imports a UI library. Long loops call
``check_stop(should_stop)`` between units of work, so a Stop button really stops them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
StopFlag = Callable[[], bool] | None


class Cancelled(RuntimeError):
    """The user stopped the job; nothing it computed was kept."""


def check_stop(should_stop: StopFlag) -> None:
    """Raise ``Cancelled`` when the stop flag is set."""
    if should_stop is not None and should_stop():
        raise Cancelled("stopped by the user")


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
