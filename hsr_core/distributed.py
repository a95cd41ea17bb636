"""Exact attribution beyond one process: the processes of ``accelerate launch`` and how work
is split among them (docs/METHOD.md, "Ships and Wanda across processes").

Under ``accelerate launch --num_processes N -m hsr_core ...`` every process runs the same
command on its own replica of the model. Ships splits the probe prompts (or, with fewer
prompts than processes, the heads) and Wanda its calibration batches; each process computes
its share and sends it to the main process, which combines the parts in the order one process
would have computed them, so the result is the same bit for bit (float32 on the CPU), and sends
the result back to every process. The cache is read and written by the main process only.

A process may hold its model on a group of GPUs instead of one (``--gpus-per-process K``:
``gpu_group``, ``local_device``), for a model larger than a GPU: process ``r`` loads it with a
``device_map`` over GPUs ``r*K .. r*K+K-1``.

A plain ``python -m hsr_core`` (or the app) is one process: ``world()`` then returns
``SINGLE`` without importing accelerate, and every caller takes its single-process path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .config import ConfigError


@dataclass(frozen=True)
class World:
    """The processes of a run: this one's ``rank`` among ``size``; rank 0 is the main one."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any] | None:
        """Every process's ``obj`` on the main process, in rank order (None elsewhere).

        Tensors should be on the CPU: a pickled CUDA tensor would be rebuilt on the sender's
        device index.
        """
        if self.size == 1:
            return [obj]
        out: list[Any] | None = [None] * self.size if self.is_main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process (what the others pass is ignored)."""
        if self.size == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj if self.is_main else None], from_process=0)[0]

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        """Leave the process group (at the end of a command; nothing for one process)."""
        if self.size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


SINGLE = World()


def world() -> World:
    """This process's place in the run: accelerate's ``PartialState`` when launched with more
    than one process (``WORLD_SIZE`` > 1: ``accelerate launch``, ``torchrun``), else ``SINGLE``
    (accelerate is not even imported)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SINGLE
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # joins the process group: NCCL on GPUs; gloo on the CPU, which PartialState takes only
    # when told (``--cpu``, or no GPU: ``--multi_gpu`` on a machine without one)
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if state.num_processes <= 1:
        return SINGLE
    return World(state.process_index, state.num_processes)


def share(n: int, rank: int, size: int) -> range:
    """This rank's contiguous block of ``n`` items split among ``size`` ranks: the first
    ``n % size`` ranks take one more, so blocks in rank order cover ``0..n-1`` in order."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside a world of {size} processes")
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def chunk_share(n: int, chunk: int, rank: int, size: int) -> range:
    """This rank's items of ``n`` split among ``size`` ranks in whole chunks of ``chunk``
    consecutive items (the last chunk may be short), so every rank's chunks are exactly the
    chunks one process would form; ranks beyond the number of chunks get nothing."""
    chunks = share(-(-n // chunk), rank, size)
    return range(min(chunks.start * chunk, n), min(chunks.stop * chunk, n))


def gpu_group(rank: int, size: int, per_process: int, visible: int) -> range:
    """The GPUs of process ``rank`` of the ``size`` on one machine when each takes
    ``per_process`` of the ``visible`` ones: ``rank * per_process`` up to
    ``rank * per_process + per_process - 1``, so the groups in rank order are disjoint and
    start at GPU 0 (GPUs left over stay unused).

    Raises:
        ConfigError: ``per_process`` below 1, or more GPUs asked for than are visible (the
            message says how many processes or GPUs per process fit).
        ValueError: ``rank`` outside ``0..size-1``.
    """
    if per_process < 1:
        raise ConfigError(f"--gpus-per-process must be at least 1, got {per_process}")
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside a world of {size} processes")
    if size * per_process > visible:

        def processes(n: int) -> str:
            return f"{n} process{'es' if n != 1 else ''}"

        fits = [f"lower --gpus-per-process to {visible // size}"] if visible >= size else []
        if visible >= per_process:
            n = visible // per_process
            fits.insert(0, f"launch {processes(n)} (accelerate launch --num_processes {n})")
        raise ConfigError(
            f"{processes(size)} with --gpus-per-process {per_process} take "
            f"{size * per_process} GPUs, but only {visible} {'is' if visible == 1 else 'are'} "
            f"visible (CUDA_VISIBLE_DEVICES): {' or '.join(fits) or 'make more GPUs visible'}"
        )
    return range(rank * per_process, (rank + 1) * per_process)


def local_device(default: str, gpus_per_process: int | None = None) -> str:
    """The device of this process's model.

    With ``default`` ``auto`` or ``cuda`` and a GPU visible:

    - ``gpus_per_process`` K given: this process's group of K GPUs (``gpu_group`` of its local
      rank among the processes on this machine), written ``cuda:N`` for one and
      ``cuda:N,M,...`` for several (the model loaded with a ``device_map`` over them,
      ``hsr_core.models.placement``); one process with K > 1 spreads over GPUs ``0..K-1``.
    - not given: one process keeps ``default`` (``auto``/``cuda``: every visible GPU); several
      take one GPU each, ``cuda:LOCAL_RANK`` (modulo the GPUs visible).

    Anything else (``cpu``, ``cuda:N``, ``mps``, or no GPU visible) is ``default``.

    Raises:
        ConfigError: K below 1; K > 1 with another device than ``auto``/``cuda`` or on a run
            without a GPU; more GPUs than are visible (``gpu_group``).
    """
    k = gpus_per_process
    if k is not None and k < 1:
        raise ConfigError(f"--gpus-per-process must be at least 1, got {k}")
    if k is not None and k > 1 and default not in ("auto", "cuda"):
        raise ConfigError(
            f"--gpus-per-process {k} spreads the model over GPUs, which --device {default} "
            "does not: use --device auto (or cuda), or drop --gpus-per-process"
        )
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if k is not None and k > 1 and visible == 0:
        raise ConfigError(
            f"--gpus-per-process {k} needs GPUs, but none is visible (a CPU run): drop "
            "--gpus-per-process, or run where CUDA GPUs are visible"
        )
    if default not in ("auto", "cuda") or visible == 0:
        return default
    w = world()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if k is None:
        return default if w.size == 1 else f"cuda:{local_rank % visible}"
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(w.size))) if w.size > 1 else 1
    group = gpu_group(local_rank if w.size > 1 else 0, local_size, k, visible)
    return "cuda:" + ",".join(str(i) for i in group)
