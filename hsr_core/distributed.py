"""Exact attribution beyond one process: the processes of ``accelerate launch`` and how work
is split among them (docs/METHOD.md, "Ships and Wanda across processes").

Under ``accelerate launch --num_processes N -m hsr_core ...`` every process runs the same
command on its own replica of the model. Ships splits the probe prompts (or, with fewer
prompts than processes, the heads) and Wanda its calibration batches; each process computes
its share and sends it to the main process, which combines the parts in the order one process
would have computed them, so the result is the same bit for bit (float32 on the CPU), and sends
the result back to every process. The cache is read and written by the main process only.

A plain ``python -m hsr_core`` (or the app) is one process: ``world()`` then returns
``SINGLE`` without importing accelerate, and every caller takes its single-process path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


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


def local_device(default: str) -> str:
    """The device of this process: its own GPU (``cuda:LOCAL_RANK``) when the run has several
    processes and a GPU is visible and ``default`` is ``auto``; else ``default``."""
    if default != "auto" or world().size == 1 or not torch.cuda.is_available():
        return default
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
