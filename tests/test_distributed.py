"""Ships and the Wanda statistics across processes (``hsr_core.distributed``): the same bits as
one process, in float32 on the CPU, with processes joined on gloo by accelerate.

The processes are started by ``torch.multiprocessing.spawn`` (the environment variables
``accelerate launch`` / ``torchrun`` set) and, for the command line, by ``accelerate launch``
itself. Every process runs with one thread, as the single-process reference does: the split is
exact only for the same arithmetic, and a matrix product may group its sums by thread count.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from hsr_core.config import ShipsConfig, WandaConfig
from hsr_core.data import Sample, builtin_calibration, with_typographic_images
from hsr_core.distributed import SINGLE, chunk_share, share, world
from hsr_core.encoding import batch_spans, iter_batches
from hsr_core.ships import ships_scores
from hsr_core.wanda import wanda_norms

ROOT = Path(__file__).resolve().parent.parent

# (name, what, settings): every case runs in every process of one spawn, in this order
SHIPS_CASES = [
    ("angle_5_prompts", 5, {"metric": "angle"}),  # 3 + 2 prompts
    ("angle_5_prompts_batch_3", 5, {"metric": "angle", "batch_size": 3}),
    ("angle_r2_uniform", 5, {"metric": "angle", "r_main": 2, "ablation": "uniform"}),
    ("kl_5_prompts", 5, {"metric": "kl"}),
    ("kl_1_prompt_heads_split", 1, {"metric": "kl", "batch_size": 3}),  # batches 3, 3 | 2
    ("kl_1_prompt_one_batch", 1, {"metric": "kl", "batch_size": 16}),  # rank 1 gets no heads
]
NORM_CASES = [
    ("norms_7_response", 7, {"batch_size": 2}),  # batches of 2, 2 | 2, 1
    ("norms_5_all", 5, {"batch_size": 1, "tokens": "all"}),  # 3 | 2 batches
]


def probes(n: int) -> list[Sample]:
    return [Sample(s.prompt) for s in builtin_calibration().safety[:n]]


def calibration(n: int) -> list[Sample]:
    return list(builtin_calibration().utility[:n])


def run_cases(loaded, ships_cases, norm_cases) -> dict:
    out = {}
    for name, n, kw in ships_cases:
        cfg = ShipsConfig(num_samples=n, **kw)
        out[name] = ships_scores(loaded, probes(n), cfg)
    for name, n, kw in norm_cases:
        out[name] = wanda_norms(loaded, calibration(n), WandaConfig(num_samples=n, **kw))
    return out


@contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, size: int, port: int, model: str, cache_root: str, out: str, cases) -> None:
    """One process of a spawned run: the cases, and the pipeline's cache (one root per rank)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        ACCELERATE_USE_CPU="true",
        TQDM_DISABLE="1",
    )
    torch.set_num_threads(1)
    from hsr_core import pipeline as pl
    from hsr_core.models import load_model

    w = world()
    assert (w.rank, w.size) == (rank, size)
    loaded = load_model(model, cache_dir=Path(cache_root))
    ships_cases, norm_cases, check_cache = cases
    result = {"cases": run_cases(loaded, ships_cases, norm_cases)}
    if not check_cache:
        torch.save(result, Path(out) / f"rank{rank}.pt")
        return w.close()
    # the pipeline's cache: read and written by the main process only, its hit sent to all
    cache = pl.ResultCache(Path(out) / f"cache{rank}")
    cfg = ShipsConfig(num_samples=3)
    first = pl.attribute(loaded, probes(3), cfg, cache)
    second = pl.attribute(loaded, probes(3), cfg, cache)
    result["cache"] = (first.cached, second.cached, first.value, second.value)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    w.close()


def spawn(size: int, model: str, cache_root: Path, out: Path, cases) -> list[dict]:
    torch.multiprocessing.spawn(
        _worker,
        args=(size, free_port(), model, str(cache_root), str(out), cases),
        nprocs=size,
        join=True,
    )
    return [torch.load(out / f"rank{r}.pt") for r in range(size)]


def same_bits(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1), b.view(-1))


def assert_same(results: list[dict], reference: dict) -> None:
    for rank, res in enumerate(results):
        for name, ref in reference.items():
            got = res["cases"][name]
            # NaN-free tables and norms: torch.equal compares every element's bits as values
            assert same_bits(got, ref), f"rank {rank}, {name}: differs from one process"


def test_share_splits_in_order_and_evenly():
    for n in range(0, 23):
        for size in range(1, 6):
            blocks = [share(n, r, size) for r in range(size)]
            assert [i for b in blocks for i in b] == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
            for chunk in (1, 2, 3, 16):
                parts = [chunk_share(n, chunk, r, size) for r in range(size)]
                assert [i for p in parts for i in p] == list(range(n))
                for p in parts:  # whole chunks of the one-process chunking
                    assert not p or (p.start % chunk == 0 and (p.stop % chunk == 0 or p.stop == n))
                assert sum(bool(p) for p in parts) == min(size, -(-n // chunk))
    with pytest.raises(ValueError, match="outside"):
        share(4, 2, 2)


def test_one_process_is_single_without_accelerate(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world() is SINGLE and SINGLE.gather(3) == [3] and SINGLE.broadcast(4) == 4


def test_batch_spans_are_the_batches_iter_batches_forms(tiny_llava):
    samples = [Sample(s.prompt) for s in builtin_calibration().utility[:7]]
    mixed = samples[:2] + with_typographic_images(samples[2:5]) + samples[5:]
    for vision, sizes in ((False, [2, 2, 2, 1]), (True, [2, 2, 1, 2])):
        spans = batch_spans(mixed, 2, vision=vision)
        assert [i for s in spans for i in s] == list(range(7))
        assert [len(s) for s in spans] == sizes
    batches = list(iter_batches(tiny_llava, mixed, 2))
    assert [b.inputs["input_ids"].shape[0] for b in batches] == [2, 2, 1, 2]


def test_two_processes_give_one_process_bits(tiny_llama, cache_root, tmp_path):
    """5 prompts on 2 processes (3 + 2), 1 prompt (heads split), Wanda over 4 and 5 batches."""
    with one_thread():
        reference = run_cases(tiny_llama, SHIPS_CASES, NORM_CASES)
    cases = (SHIPS_CASES, NORM_CASES, True)
    results = spawn(2, "builtin:tiny-llama", cache_root, tmp_path, cases)
    assert_same(results, reference)
    # the cache: the main process wrote it once, the other never touched its own, and the
    # second call was a hit for both (the main process sent it)
    for rank, res in enumerate(results):
        first_cached, second_cached, first, second = res["cache"]
        assert (first_cached, second_cached) == (False, True), rank
        assert torch.equal(first, second) and torch.equal(first, results[0]["cache"][2])
    assert list((tmp_path / "cache0").rglob("*.safetensors"))
    assert not (tmp_path / "cache1").exists()


def test_three_processes_split_heads_and_skipped_layers(tiny_mllama, cache_root, tmp_path):
    """2 prompts on 3 processes: the heads are split for the angle; Mllama's cross-attention
    layer, skipped without an image, gets the intact state in the assembled table."""
    cases = (
        [
            ("angle_2_prompts_heads_split", 2, {"metric": "angle", "batch_size": 2}),
            ("kl_2_prompts_heads_split", 2, {"metric": "kl", "batch_size": 3}),
        ],
        [],
        False,
    )
    with one_thread(), pytest.warns(UserWarning, match="never ran"):
        reference = run_cases(tiny_mllama, *cases[:2])
    results = spawn(3, "builtin:tiny-mllama", cache_root, tmp_path, cases)
    assert_same(results, reference)


def test_accelerate_launch_writes_one_process_files(cache_root, tmp_path):
    """``accelerate launch -m hsr_core attribute`` and ``calibrate`` with 2 processes write the
    heads.jsonl and norms of one process, byte for byte."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env.pop("WORLD_SIZE", None)
    common = ["--model", "builtin:tiny-llama", "--data", "builtin", "--ships-samples", "5"]
    common += ["--calib-samples", "7", "--calib-batch", "2", "--recompute", "--quiet"]
    common += ["--cache-dir", str(cache_root)]
    # on the CPU accelerate starts several processes with its torch.distributed launcher
    # (--multi_gpu); with --cpu alone it starts one (its multi-CPU path is mpirun)
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu"]
    launch += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m"]
    for command, file in (("attribute", "heads.jsonl"), ("calibrate", "norms.safetensors")):
        outs = {}
        for how, prefix in (("one", [sys.executable, "-m"]), ("two", launch)):
            folder = tmp_path / f"{command}-{how}"
            cmd = prefix + ["hsr_core", command, *common, "--out", str(folder)]
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-3000:]
            outs[how] = (folder / file).read_bytes()
        assert outs["one"] == outs["two"], command
