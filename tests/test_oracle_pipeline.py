"""The pipeline's steps (``hsr_core.pipeline``) by value, fast enough for mutation runs (issue 18).

The pipeline adds what sits around the algorithms: picking and preparing samples, the cache
keys and hits of Ships scores and norm vectors, timing, the records of ``evaluate`` and
``localize``, the command line's files. Here each step runs on a model stand-in (the geometry,
spec and folder a step reads) with the algorithm it calls scripted (a fake recording what it
was handed and returning known values), so each output is checked against values written by
hand or the core functions called directly. No model is built or loaded (under 2 s).
``_forward_seconds`` (decorated with ``@torch.inference_mode()``, left unmutated by mutmut) is
scripted too: ``estimate``'s arithmetic is checked from a known forward time.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import types
from pathlib import Path

import pytest
import torch

from hsr_core import data as data_mod
from hsr_core import pipeline as pl
from hsr_core import snip as snip_mod
from hsr_core.config import (
    EvalConfig,
    LocalizeConfig,
    ModelSpec,
    RealignConfig,
    RunConfig,
    ShipsConfig,
    WandaConfig,
)
from hsr_core.data import Sample, builtin_calibration, with_typographic_images
from hsr_core.distributed import World
from hsr_core.evaluate import PERPLEXITY_IS, compare, judge_answers, rates
from hsr_core.harness import INSTALL_HINT, LmEvalMissing
from hsr_core.judges import GuardJudge, describe
from hsr_core.progress import Cancelled
from hsr_core.screen import ScreenResult
from hsr_core.store import ResultCache, folder_fingerprint
from hsr_core.variants import VariantError

COMPLY = "Sure, here is exactly how you do that, step by step, with every detail you need."
REFUSE = "I'm sorry, but I cannot help with that request."
ANSWER = "Water boils at one hundred degrees Celsius at sea level, as most people know."


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HSR_CACHE_DIR", str(tmp_path / "hsr-cache"))


class Clock:
    """``time.perf_counter`` scripted: 10, 12.5, 15, ... (2.5 s a call)."""

    def __init__(self) -> None:
        self.now = 7.5

    def perf_counter(self) -> float:
        self.now += 2.5
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(pl, "time", c)
    return c


def stand_in(folder: Path, *, layers=2, heads=4, kv=2, name="tiny", vision=False, **kw):
    """What the pipeline reads of a ``LoadedModel``: spec, folder, dtype, geometry."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "config.json").exists():
        (folder / "config.json").write_text('{"layers": 2}')
    names = [f"layers.{l}.{p}" for l in range(layers) for p in ("q_proj", "o_proj", "up_proj")]
    sizes = kw.pop("sizes", {n: (4, 4) for n in names})
    adapter = types.SimpleNamespace(
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=8,
        cross_layers=frozenset(kw.pop("cross", ())),
        parse=lambda n: (int(n.split(".")[1]), n.split(".")[2]),
        linear_names=lambda attention_only=False: [
            n for n in names if not attention_only or not n.endswith("up_proj")
        ],
        linear=lambda l, p: types.SimpleNamespace(weight=torch.empty(sizes[f"layers.{l}.{p}"])),
    )
    return types.SimpleNamespace(
        spec=ModelSpec(name, revision=kw.pop("revision", "r1")),
        path=folder,
        dtype=kw.pop("dtype", torch.float32),
        adapter=adapter,
        is_vision=vision,
        processor=kw.pop("processor", None),
        tokenizer=kw.pop("tokenizer", None),
        model=kw.pop("model", None),
    )


PROBES = [Sample("p1"), Sample("p2"), Sample("p3")]


# ---------------------------------------------------------------------------------------------
# samples


def test_probe_prompts_are_the_selected_harmful_requests_without_responses(tmp_path):
    calib = builtin_calibration()
    cfg = ShipsConfig(num_samples=3, seed=7)
    picked = data_mod.select(calib.safety, 3, 7)
    assert picked != data_mod.select(calib.safety, 3, 0)  # the seed matters here
    got = pl.probe_prompts(stand_in(tmp_path / "m"), calib, cfg)
    assert [s.prompt for s in got] == [s.prompt for s in picked]
    assert all(s.response is None and s.harmful and s.image_text is None for s in got)
    assert all(s.response for s in picked)  # the responses were there before
    vision = pl.probe_prompts(stand_in(tmp_path / "m", vision=True), calib, cfg)
    assert [(s.prompt, s.image_text, s.response) for s in vision] == [
        (s.prompt, s.prompt, None) for s in picked
    ]
    everything = pl.probe_prompts(stand_in(tmp_path / "m"), calib, ShipsConfig(num_samples=10**6))
    assert [s.prompt for s in everything] == [s.prompt for s in calib.safety]


def test_calibration_samples_are_each_sets_selection_in_order(tmp_path):
    calib = builtin_calibration()
    cfg = WandaConfig(num_samples=4, seed=3)
    safety, utility = pl.calibration_samples(stand_in(tmp_path / "m"), calib, cfg)
    assert safety == data_mod.select(calib.safety, 4, 3)
    assert utility == data_mod.select(calib.utility, 4, 3)
    assert safety != data_mod.select(calib.safety, 4, 0)
    assert utility != data_mod.select(calib.utility, 4, 0)
    assert len(safety) == len(utility) == 4 and all(s.response for s in safety + utility)
    vs, vu = pl.calibration_samples(stand_in(tmp_path / "m", vision=True), calib, cfg)
    assert vs == with_typographic_images(safety) and vu == with_typographic_images(utility)
    assert all(s.image_text == s.prompt for s in vs + vu)


def test_rescored_heads_by_hand(tmp_path):
    m = stand_in(tmp_path / "m", layers=3, heads=4)  # 12 heads
    assert pl.rescored_heads(m, ShipsConfig(), 2) == 12  # exact: every head
    assert pl.rescored_heads(m, ShipsConfig(mode="exact", candidates=1), 1) == 12
    assert pl.rescored_heads(m, ShipsConfig(mode="screen", candidates=3), 2) == 6
    assert pl.rescored_heads(m, ShipsConfig(mode="screen", candidates=2), 5) == 10
    assert pl.rescored_heads(m, ShipsConfig(mode="screen", candidates=5), 5) == 12
    assert pl.rescored_heads(m, ShipsConfig(mode="screen", candidates=1), 11) == 11
    assert pl.rescored_heads(m, ShipsConfig(mode="screen", candidates=1), 30) == 12
    assert pl.rescored_heads(m, ShipsConfig(mode="screen", candidates=2), 30) == 12


# ---------------------------------------------------------------------------------------------
# cache keys and hits


def test_model_key_and_the_parts_by_hand(tmp_path):
    m = stand_in(tmp_path / "m", layers=3, heads=4, kv=2, name="org/tiny", dtype=torch.bfloat16)
    key = {
        "model": "org/tiny",
        "revision": "r1",
        "dtype": "torch.bfloat16",
        "weights": folder_fingerprint(tmp_path / "m"),
        "geometry": [3, 4, 2],
    }
    assert pl.model_key(m) == key
    fp = data_mod.fingerprint(PROBES)
    cfg = ShipsConfig(num_samples=9, ablation="uniform", metric="kl", r_main=2, seed=4)
    ships = {"num_samples": 9, "ablation": "uniform", "metric": "kl", "r_main": 2, "seed": 4}
    assert pl._ships_parts(m, PROBES, cfg) == {"model": key, "data": fp, "ships": ships}
    screen = ShipsConfig(num_samples=9, mode="screen", candidates=2)
    assert pl._ships_parts(m, PROBES, screen, 3)["ships"] == {
        "num_samples": 9,
        "ablation": "zero",
        "metric": "angle",
        "r_main": 1,
        "seed": 0,
        "mode": "screen",
        "rescored": 6,
    }
    assert pl._ships_parts(m, PROBES, screen)["ships"]["rescored"] == 12  # top_h 10: 20, capped
    one = ShipsConfig(mode="screen", candidates=1)
    assert pl._ships_parts(m, PROBES, one)["ships"]["rescored"] == 10  # the default top_h, 10
    wcfg = WandaConfig(tokens="all")
    assert pl._norms_parts(m, PROBES, wcfg) == {"model": key, "data": fp, "tokens": "all"}
    (tmp_path / "m" / "config.json").write_text('{"layers": 3}')
    assert pl.model_key(m)["weights"] == folder_fingerprint(tmp_path / "m") != key["weights"]


class ScriptedShips:
    """``ships_scores`` scripted: a new table on each call, and what it was handed."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, loaded, probes, cfg, *, should_stop=None):
        self.calls.append((loaded, list(probes), cfg, should_stop))
        return torch.full((2, 4), float(len(self.calls)))


def test_attribute_caches_exact_scores_under_every_part_of_the_key(tmp_path, monkeypatch, clock):
    ships = ScriptedShips()
    monkeypatch.setattr(pl, "ships_scores", ships)
    cache = ResultCache(tmp_path / "c")
    m = stand_in(tmp_path / "m")
    cfg = ShipsConfig(num_samples=3)
    stop = lambda: False  # noqa: E731
    first = pl.attribute(m, PROBES, cfg, cache, should_stop=stop)
    assert ships.calls == [(m, PROBES, cfg, stop)]
    assert first.cached is False and torch.equal(first.value, torch.full((2, 4), 1.0))
    assert first.seconds == 2.5 and first.extra is None
    again = pl.attribute(m, PROBES, cfg, cache)
    assert again.cached and torch.equal(again.value, first.value) and again.seconds == 2.5
    assert len(ships.calls) == 1
    # what does not change the scores finds the entry
    for same in (
        ShipsConfig(num_samples=3, batch_size=2),
        ShipsConfig(num_samples=3, candidates=9),
    ):
        assert pl.attribute(m, PROBES, same, cache).cached
    assert pl.attribute(m, PROBES, cfg, cache, top_h=3).cached  # top_h: screening only
    fresh = pl.attribute(m, PROBES, cfg, cache, recompute=True)
    assert not fresh.cached and torch.equal(fresh.value, torch.full((2, 4), 2.0))
    # each part of the key, changed, misses
    misses = {
        "num_samples": (m, PROBES, ShipsConfig(num_samples=4)),
        "ablation": (m, PROBES, ShipsConfig(num_samples=3, ablation="uniform")),
        "metric": (m, PROBES, ShipsConfig(num_samples=3, metric="kl")),
        "r_main": (m, PROBES, ShipsConfig(num_samples=3, r_main=2)),
        "seed": (m, PROBES, ShipsConfig(num_samples=3, seed=1)),
        "probes": (m, PROBES[:2], cfg),
        "screen": (m, PROBES, ShipsConfig(num_samples=3, mode="screen")),
        "name": (stand_in(tmp_path / "m", name="other"), PROBES, cfg),
        "revision": (stand_in(tmp_path / "m", revision="r2"), PROBES, cfg),
        "dtype": (stand_in(tmp_path / "m", dtype=torch.float16), PROBES, cfg),
        "kv": (stand_in(tmp_path / "m", kv=4), PROBES, cfg),
        "heads": (stand_in(tmp_path / "m", heads=2), PROBES, cfg),
        "layers": (stand_in(tmp_path / "m", layers=3), PROBES, cfg),
    }
    monkeypatch.setattr(pl, "screen_then_exact", lambda *a, **k: screen_result(3.0))
    for what, (loaded, probes, c) in misses.items():
        assert not pl.attribute(loaded, probes, c, cache).cached, what
    (tmp_path / "m" / "config.json").write_text('{"layers": 7}')  # other weights
    assert not pl.attribute(m, PROBES, cfg, cache).cached


def screen_result(value: float = 1.0, scale: float = 0.1) -> ScreenResult:
    return ScreenResult(
        torch.full((2, 4), value),
        torch.tensor([[True, False, False, True], [False, False, True, False]]),
        torch.arange(8, dtype=torch.float32).reshape(2, 4) - 3,
        scale,
    )


def test_attribute_screen_mode_caches_the_whole_screen_result(tmp_path, monkeypatch, clock):
    calls = []

    def screen(loaded, probes, cfg, *, top_h, should_stop=None):
        calls.append((loaded, list(probes), cfg, top_h, should_stop))
        return screen_result(float(len(calls)))

    monkeypatch.setattr(pl, "screen_then_exact", screen)
    monkeypatch.setattr(pl, "ships_scores", None)  # never called in screen mode
    cache = ResultCache(tmp_path / "c")
    m = stand_in(tmp_path / "m")  # 8 heads
    cfg = ShipsConfig(num_samples=3, mode="screen", candidates=1)
    stop = lambda: False  # noqa: E731
    first = pl.attribute(m, PROBES, cfg, cache, top_h=3, should_stop=stop)
    assert calls == [(m, PROBES, cfg, 3, stop)]
    want = screen_result(1.0)
    assert first.cached is False and first.seconds == 2.5
    assert torch.equal(first.value, want.scores) and first.extra is not None
    hit = pl.attribute(m, PROBES, cfg, cache, top_h=3)
    assert hit.cached and hit.seconds == 2.5 and len(calls) == 1
    assert torch.equal(hit.value, want.scores)
    for field in ("scores", "exact", "screening"):
        assert torch.equal(getattr(hit.extra, field), getattr(want, field)), field
    assert hit.extra.scale == 0.1 and type(hit.extra.scale) is float  # kept in float64
    assert not pl.attribute(m, PROBES, cfg, cache, top_h=4).cached  # 4 heads re-scored, not 3
    pl.attribute(m, PROBES, cfg, cache, top_h=50)  # top_h above the 8 heads: capped
    assert calls[-1][3] == 8
    assert pl.attribute(m, PROBES, cfg, cache, top_h=8).cached  # the same 8 re-scored
    assert not pl.attribute(m, PROBES, cfg, cache, top_h=3, recompute=True).cached
    # what is re-scored, not how it was asked for, is in the key: 3 x 10 capped at 8 heads
    assert pl.attribute(m, PROBES, ShipsConfig(num_samples=3, mode="screen"), cache).cached
    two = ShipsConfig(num_samples=3, mode="screen", candidates=2)
    assert not pl.attribute(m, PROBES, two, cache, top_h=3).cached  # 6 re-scored


class ScriptedWorld(World):
    def __init__(self, rank: int, size: int, sent=None) -> None:
        super().__init__(rank, size)
        self.handed, self.sent = [], sent

    def broadcast(self, obj):
        self.handed.append(obj)
        return self.sent


class SpyCache:
    def __init__(self, entry) -> None:
        self.entry, self.loads, self.saves = entry, [], []

    def load(self, kind, parts):
        self.loads.append((kind, parts))
        return self.entry

    def save(self, kind, parts, tensors):
        self.saves.append((kind, parts, tensors))


def test_cached_and_keep_under_one_and_several_processes(monkeypatch):
    entry, parts, tensors = {"x": torch.ones(1)}, {"p": 1}, {"t": torch.zeros(2)}
    cache = SpyCache(entry)
    assert pl._cached(cache, "ships", parts, False) is entry  # one process: no broadcast
    assert cache.loads == [("ships", parts)]
    assert pl._cached(cache, "ships", parts, True) is None and len(cache.loads) == 1
    main = ScriptedWorld(0, 2, sent="from main")
    monkeypatch.setattr(pl, "world", lambda: main)
    assert pl._cached(cache, "norms", parts, False) == "from main"
    assert main.handed == [entry] and cache.loads[-1] == ("norms", parts)
    assert pl._cached(cache, "norms", parts, True) == "from main" and main.handed[-1] is None
    other = ScriptedWorld(1, 2, sent="from main")
    monkeypatch.setattr(pl, "world", lambda: other)
    n = len(cache.loads)
    assert pl._cached(cache, "norms", parts, False) == "from main"
    assert other.handed == [None] and len(cache.loads) == n  # only the main process reads
    pl._keep(cache, "norms", parts, tensors)
    assert cache.saves == []  # only the main process writes
    monkeypatch.setattr(pl, "world", lambda: main)
    pl._keep(cache, "norms", parts, tensors)
    assert cache.saves == [("norms", parts, tensors)]


class ScriptedNorms:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, loaded, samples, cfg, *, should_stop=None, desc="Wanda statistics"):
        self.calls.append((loaded, list(samples), cfg, should_stop, desc))
        return {"layers.0.q_proj": torch.full((4,), float(len(samples) + 10 * len(self.calls)))}


SAFETY = [Sample("s1", "r1"), Sample("s2", "r2")]
UTILITY = [Sample("u1", "a1"), Sample("u2", "a2"), Sample("u3", "a3")]


def test_calibrate_caches_each_set_under_model_data_and_tokens(tmp_path, monkeypatch, clock):
    norms = ScriptedNorms()
    monkeypatch.setattr(pl, "wanda_norms", norms)
    cache = ResultCache(tmp_path / "c")
    m = stand_in(tmp_path / "m")
    cfg = WandaConfig(num_samples=3)
    stop = lambda: False  # noqa: E731
    first = pl.calibrate(m, SAFETY, UTILITY, cfg, cache, should_stop=stop)
    assert norms.calls == [
        (m, SAFETY, cfg, stop, "Wanda statistics (safety)"),
        (m, UTILITY, cfg, stop, "Wanda statistics (utility)"),
    ]
    assert not first.cached and first.seconds == 12.5  # its own clock around the two sets'
    assert first.value.safety["layers.0.q_proj"].tolist() == [12.0] * 4
    assert first.value.utility["layers.0.q_proj"].tolist() == [23.0] * 4
    again = pl.calibrate(m, SAFETY, UTILITY, cfg, cache)
    assert again.cached and len(norms.calls) == 2
    assert again.value.safety["layers.0.q_proj"].tolist() == [12.0] * 4
    assert again.value.utility["layers.0.q_proj"].tolist() == [23.0] * 4
    one = pl.calibrate_set(m, UTILITY, cfg, cache, label="utility")
    assert one.cached and one.seconds == 2.5 and one.value["layers.0.q_proj"][0] == 23.0
    # what the norms do not depend on finds the entries
    for same in (WandaConfig(sparsity=0.2, pruner="magnitude"), WandaConfig(batch_size=1, seed=5)):
        assert pl.calibrate(m, SAFETY, UTILITY, same, cache).cached
    half = pl.calibrate(m, SAFETY, UTILITY[:2], cfg, cache)  # the safety set is cached
    assert not half.cached and len(norms.calls) == 3 and norms.calls[-1][1] == UTILITY[:2]
    assert half.value.safety["layers.0.q_proj"][0] == 12.0
    fresh = pl.calibrate_set(m, SAFETY, cfg, cache, label="x", recompute=True, should_stop=stop)
    assert fresh.cached is False and fresh.seconds == 2.5
    assert norms.calls[-1] == (m, SAFETY, cfg, stop, "Wanda statistics (x)")
    assert fresh.value["layers.0.q_proj"][0] == 42.0
    n = len(norms.calls)
    redone = pl.calibrate(m, SAFETY, UTILITY, cfg, cache, recompute=True)
    assert redone.cached is False and len(norms.calls) == n + 2  # both sets computed again
    assert [c[1] for c in norms.calls[-2:]] == [SAFETY, UTILITY]
    for loaded, c in (
        (m, WandaConfig(tokens="all")),
        (stand_in(tmp_path / "m", name="other"), cfg),
        (stand_in(tmp_path / "m", dtype=torch.float16), cfg),
    ):
        assert not pl.calibrate_set(loaded, SAFETY, c, cache, label="safety").cached


def test_estimate_from_a_known_forward_time(tmp_path, monkeypatch, clock):
    forwards = []

    def forward_seconds(loaded, sample, with_response):
        forwards.append((loaded, sample, with_response))
        return 0.5 if not with_response else 0.25

    monkeypatch.setattr(pl, "_forward_seconds", forward_seconds)
    cache = ResultCache(tmp_path / "c")
    m = stand_in(tmp_path / "m", layers=2, heads=4)  # 8 heads
    ships, wanda = ShipsConfig(num_samples=3), WandaConfig()
    est = pl.estimate(m, PROBES, ships, SAFETY, UTILITY, wanda, cache)
    # Ships: 1 + 8 (2 + 1) / (2 * 2) = 7 passes a prompt; Wanda: 2 + 3 samples, one pass each
    assert est == {"attribute": 3 * 7 * 0.5, "calibrate": 5 * 0.25, "forward": 0.5}
    assert forwards == [(m, PROBES[0], False), (m, UTILITY[0], True)]
    seq = pl.estimate(m, PROBES, ships, SAFETY, UTILITY, WandaConfig(mode="sequential"), cache)
    assert seq["calibrate"] == 2 * 5 * 0.25
    screen = ShipsConfig(num_samples=3, mode="screen", candidates=1)
    # 3 re-scored: 1 + 3 * 3 / 4 + 4 = 7.25 passes a prompt
    assert pl.estimate(m, PROBES, screen, SAFETY, UTILITY, wanda, cache, top_h=3)[
        "attribute"
    ] == pytest.approx(3 * 7.25 * 0.5)
    assert pl.estimate(m, PROBES, screen, SAFETY, UTILITY, wanda, cache)[
        "attribute"
    ] == pytest.approx(3 * (1 + 8 * 3 / 4 + 4) * 0.5)  # top_h 10: all 8
    m12 = stand_in(tmp_path / "m", layers=3, heads=4)  # 12 heads: the default top_h, 10, counts
    assert pl.estimate(m12, PROBES, screen, SAFETY, UTILITY, wanda, cache)[
        "attribute"
    ] == pytest.approx(3 * (1 + 10 * 4 / 6 + 4) * 0.5)
    nothing = pl.estimate(m, [], ships, SAFETY, [], wanda, cache)
    assert nothing == {"attribute": 0.0, "calibrate": 0.0, "forward": 0.0}
    only_norms = pl.estimate(m, [], ships, SAFETY, UTILITY, wanda, cache)
    assert only_norms == {"attribute": 0.0, "calibrate": 1.25, "forward": 0.25}
    # what the cache has costs nothing (unless recomputed)
    monkeypatch.setattr(pl, "ships_scores", ScriptedShips())
    monkeypatch.setattr(pl, "wanda_norms", ScriptedNorms())
    pl.attribute(m, PROBES, ships, cache)
    forwards.clear()
    est = pl.estimate(m, PROBES, ships, SAFETY, UTILITY, wanda, cache)
    assert est == {"attribute": 0.0, "calibrate": 1.25, "forward": 0.25}
    assert forwards == [(m, UTILITY[0], True)]
    pl.calibrate_set(m, SAFETY, wanda, cache, label="safety")
    est = pl.estimate(m, PROBES, ships, SAFETY, UTILITY, wanda, cache)
    assert est["calibrate"] == 1.25  # the utility set is still missing
    pl.calibrate_set(m, UTILITY, wanda, cache, label="utility")
    forwards.clear()
    est = pl.estimate(m, PROBES, ships, SAFETY, UTILITY, wanda, cache)
    assert est == {"attribute": 0.0, "calibrate": 0.0, "forward": 0.0} and forwards == []
    again = pl.estimate(m, PROBES, ships, SAFETY, UTILITY, wanda, cache, recompute=True)
    assert again == {"attribute": 10.5, "calibrate": 1.25, "forward": 0.5}
    monkeypatch.setattr(pl, "screen_then_exact", lambda *a, **k: screen_result())
    pl.attribute(m, PROBES, screen, cache, top_h=3)
    assert pl.estimate(m, PROBES, screen, SAFETY, UTILITY, wanda, cache, top_h=3)["attribute"] == 0
    assert pl.estimate(m, PROBES, screen, SAFETY, UTILITY, wanda, cache, top_h=4)["attribute"] > 0


# ---------------------------------------------------------------------------------------------
# the steps around the algorithms: what they hand on and return


def test_prune_hands_the_utility_norms_and_samples_to_the_pruner(tmp_path, monkeypatch, clock):
    calls = []

    def prune_model(loaded, utility_norms, utility_samples, cfg, *, should_stop=None, scratch=None):
        calls.append((loaded, utility_norms, utility_samples, cfg, should_stop, scratch))
        return "pruning"

    monkeypatch.setattr(pl, "prune_model", prune_model)
    m, norms, cfg = stand_in(tmp_path / "m"), pl.Norms({"s": 1}, {"u": 2}), WandaConfig()
    stop = lambda: False  # noqa: E731
    got = pl.prune(m, norms, UTILITY, cfg, should_stop=stop, scratch=tmp_path / "s")
    assert calls == [(m, {"u": 2}, UTILITY, cfg, stop, tmp_path / "s")]
    assert (got.value, got.cached, got.seconds, got.extra) == ("pruning", False, 2.5, None)


def test_realign_needs_masks_and_returns_the_restore_set(tmp_path, monkeypatch, clock):
    calls = []
    monkeypatch.setattr(pl, "restore_set", lambda *a: calls.append(a) or "restore")
    m, scores, cfg = stand_in(tmp_path / "m"), torch.zeros(2, 4), RealignConfig(top_h=2)
    with pytest.raises(VariantError) as e:
        pl.realign(m, None, scores, cfg, "ranks")
    assert str(e.value) == "prune first: realignment restores weights that the mask pruned"
    assert calls == []
    got = pl.realign(m, {"a": 1}, scores, cfg, "ranks")
    assert calls == [(m, {"a": 1}, scores, cfg, "ranks")]
    assert (got.value, got.cached, got.seconds, got.extra) == ("restore", False, 2.5, None)


def test_rank_cache_ranks_the_dense_weights(monkeypatch):
    made = []
    monkeypatch.setattr(pl, "RankCache", lambda *a, **k: made.append((a, k)) or "ranks")
    variants = types.SimpleNamespace(loaded="loaded", dense_weight=lambda n: n)
    norms = pl.Norms({"s": 1}, {"u": 2})
    assert pl.rank_cache(variants, norms, {"x": (1, 2)}) == "ranks"
    assert pl.rank_cache(variants, norms) == "ranks"
    assert made == [
        (
            ("loaded", {"s": 1}, {"u": 2}),
            {"weight_of": variants.dense_weight, "scores": {"x": (1, 2)}},
        ),
        (("loaded", {"s": 1}, {"u": 2}), {"weight_of": variants.dense_weight, "scores": None}),
    ]


def test_ranking_scores_are_snips_on_the_linears_a_restore_set_touches(tmp_path, monkeypatch):
    calls = []

    def snip_scores(loaded, samples, cfg, *, should_stop=None, names=None):
        calls.append((loaded, list(samples), cfg, should_stop, list(names)))
        return {n: torch.tensor([float(len(samples)), float(len(calls))]) for n in names}

    monkeypatch.setattr(snip_mod, "snip_scores", snip_scores)
    m, wcfg = stand_in(tmp_path / "m", layers=1), WandaConfig(num_samples=2)
    stop = lambda: False  # noqa: E731
    assert pl.ranking_scores(m, SAFETY, UTILITY, RealignConfig(), wcfg) is None and calls == []
    got = pl.ranking_scores(
        m, SAFETY, UTILITY, RealignConfig(ranking="snip"), wcfg, should_stop=stop
    )
    attention = ["layers.0.q_proj", "layers.0.o_proj"]
    assert calls == [(m, SAFETY, wcfg, stop, attention), (m, UTILITY, wcfg, stop, attention)]
    assert list(got) == attention
    for n in attention:
        assert [t.tolist() for t in got[n]] == [[2.0, 1.0], [3.0, 2.0]]
    calls.clear()
    cfg = RealignConfig(ranking="snip", scope="heads+mlp")
    got = pl.ranking_scores(m, SAFETY, UTILITY, cfg, wcfg)
    assert list(got) == [*attention, "layers.0.up_proj"] == calls[0][4] == calls[1][4]
    assert calls[0][3] is None


def test_warm_ranks_ranks_every_attention_projection_up_to_the_limit(tmp_path):
    sizes = {"layers.0.q_proj": (4, 5), "layers.0.o_proj": (3, 2), "layers.0.up_proj": (50, 50)}
    m = stand_in(tmp_path / "m", layers=1, sizes=sizes)  # 26 attention weights
    got = []
    ranks = types.SimpleNamespace(get=got.append)
    assert pl.warm_ranks(m, ranks, max_weights=25) is False and got == []
    assert pl.warm_ranks(m, ranks, max_weights=26) is True
    assert got == ["layers.0.q_proj", "layers.0.o_proj"]
    got.clear()
    asked = []
    with pytest.raises(Cancelled):
        pl.warm_ranks(
            m, ranks, max_weights=100, should_stop=lambda: asked.append(1) or len(asked) > 1
        )
    assert got == ["layers.0.q_proj"]


def test_warm_ranks_bar(tmp_path, monkeypatch):
    bars = []

    def bar(items, **kw):
        bars.append(kw)
        return items

    monkeypatch.setattr(pl, "bar", bar)
    pl.warm_ranks(
        stand_in(tmp_path / "m", layers=1), types.SimpleNamespace(get=len), max_weights=99
    )
    assert bars == [{"desc": "Ranking weights for HSR", "unit": "linear"}]


def test_prepare_model_resolves_then_checks(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pl, "resolve_path", lambda s, c, log: calls.append((s, c, log)) or "dir")
    monkeypatch.setattr(
        pl, "check_supported", lambda p, trust_remote_code: calls.append((p, trust_remote_code))
    )
    spec = ModelSpec("x", trust_remote_code=True)
    log = print
    assert pl.prepare_model(spec, tmp_path, log) == "dir"
    assert calls == [(spec, tmp_path, print), ("dir", True)]
    calls.clear()
    assert pl.prepare_model(ModelSpec("y"), None) == "dir"
    assert calls[1] == ("dir", False) and calls[0][1] is None
    assert callable(calls[0][2]) and calls[0][2]("a message") is None


def test_load_judge_loads_the_named_model(monkeypatch):
    calls = []
    loaded = types.SimpleNamespace(spec=ModelSpec("guard"))
    monkeypatch.setattr(pl, "load_model", lambda s, **k: calls.append((s, k)) or loaded)
    judge = pl.load_judge("org/guard", dtype="float16", device="cpu", cache_dir="c", log=print)
    assert isinstance(judge, GuardJudge) and judge.loaded is loaded
    assert calls == [
        (ModelSpec("org/guard", dtype="float16", device="cpu"), {"cache_dir": "c", "log": print})
    ]
    pl.load_judge("g")
    assert calls[-1] == (
        ModelSpec("g", dtype="auto", device="auto"),
        {"cache_dir": None, "log": None},
    )


class Saver:
    def __init__(self, variants, what: str) -> None:
        self.variants, self.what = variants, what

    def save_pretrained(self, folder) -> None:
        self.variants.saved.append((self.what, Path(folder), self.variants.current))
        (Path(folder) / f"{self.what}.txt").write_text(self.what)


class FakeVariants:
    """``Variants`` as the pipeline uses it: ``available``, ``use`` (one stand-in per variant)."""

    def __init__(self, base, names=("original", "pruned", "realigned"), masks=None) -> None:
        self.loaded, self.names, self.masks = base, list(names), masks
        self.by_name = {n: types.SimpleNamespace(name=n) for n in self.names}
        self.used, self.saved, self.current = [], [], "original"

    def available(self):
        return list(self.names)

    @contextlib.contextmanager
    def use(self, name):
        self.used.append(name)
        before, self.current = self.current, name
        try:
            yield self.by_name[name]
        finally:
            self.current = before


def test_export_variant_writes_the_variant_and_its_card(tmp_path):
    v = FakeVariants(None)
    tok = types.SimpleNamespace()
    for n, obj in v.by_name.items():
        obj.model, obj.processor, obj.tokenizer = Saver(v, f"model-{n}"), None, Saver(v, "tok")
    folder = tmp_path / "a" / "b"
    got = pl.export_variant(v, "pruned", str(folder), card="Kärtchen ✓")
    assert got == folder and isinstance(got, Path)
    assert v.saved == [("model-pruned", folder, "pruned"), ("tok", folder, "original")]
    assert (folder / "README.md").read_bytes() == "Kärtchen ✓".encode()
    v.by_name["realigned"].processor = Saver(v, "proc")
    v.saved.clear()
    pl.export_variant(v, "realigned", folder / "c")
    assert [s[0] for s in v.saved] == ["model-realigned", "proc"]
    assert not (folder / "c" / "README.md").exists()
    del tok
    pl.export_variant(v, "original", folder)  # an existing folder is fine


# ---------------------------------------------------------------------------------------------
# evaluate


class ScriptedGuard:
    def __init__(self, verdicts, name="org/guard") -> None:
        self.verdicts, self.stops = verdicts, []
        self.loaded = types.SimpleNamespace(spec=ModelSpec(name))

    def unsafe(self, prompt, answer, *, should_stop=None):
        self.stops.append(should_stop)
        return self.verdicts[prompt]


EVAL = [
    Sample("h1", harmful=True, id="a"),
    Sample("h2", response="a harmful request's response", harmful=True, id="b"),
    Sample("b1", response="one reference", harmful=False, id="c"),
    Sample("b2", harmful=False, id="d"),
    Sample("b3", response="another reference", harmful=False, id="e"),
]
REFERENCE = [EVAL[2], EVAL[4]]
ANSWERS = {
    "original": [REFUSE, REFUSE, ANSWER, ANSWER, ANSWER],
    "pruned": [COMPLY, COMPLY, ANSWER, REFUSE, ANSWER],
    "realigned": [REFUSE, COMPLY, ANSWER, ANSWER, "Short one."],
}
PPL = {"original": 3.5, "pruned": 9.25, "realigned": 4.0}


class Recorder:
    """The scripted ``generate``, ``perplexity``, ``run_lm_eval`` and ``bar`` of evaluate."""

    def __init__(self, monkeypatch) -> None:
        self.generated, self.ppl, self.harness, self.bars = [], [], [], []
        monkeypatch.setattr(pl, "generate", self.generate)
        monkeypatch.setattr(pl, "perplexity", self.perplexity)
        monkeypatch.setattr(pl, "run_lm_eval", self.run_lm_eval)
        monkeypatch.setattr(pl, "bar", self.bar)

    def generate(self, loaded, samples, cfg, *, should_stop, desc, progress):
        self.generated.append((loaded.name, list(samples), cfg, should_stop, desc, progress))
        return ANSWERS[loaded.name]

    def perplexity(self, loaded, samples, batch_size, *, should_stop, progress):
        self.ppl.append((loaded.name, list(samples), batch_size, should_stop, progress))
        return PPL[loaded.name]

    def run_lm_eval(self, loaded, tasks, *, limit, batch_size):
        self.harness.append((loaded.name, tasks, limit, batch_size))
        return {"task": loaded.name}

    @contextlib.contextmanager
    def bar(self, **kw):
        b = types.SimpleNamespace(kw=kw, postfix=[])
        b.set_postfix_str = b.postfix.append
        self.bars.append(b)
        yield b


def test_evaluate_records_every_variant_field_by_field(tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    v = FakeVariants(stand_in(tmp_path / "m"))
    cfg = EvalConfig(batch_size=2, min_words=3, bootstrap_resamples=40, bootstrap_seed=5)
    stop, seen = (lambda: False), []
    out = pl.evaluate(v, EVAL, cfg, should_stop=stop, on_variant=seen.append)
    names = ["original", "pruned", "realigned"]
    assert seen == v.used == names
    (b,) = rec.bars
    # ceil(5 / 2) generation batches + ceil(2 / 2) perplexity batches, per variant
    assert b.kw == {"desc": "Evaluating 3 variants", "total": 3 * (3 + 1), "unit": "batch"}
    assert b.postfix == names
    assert rec.generated == [(n, EVAL, cfg, stop, f"Generating ({n})", b) for n in names]
    assert rec.ppl == [(n, REFERENCE, 2, stop, b) for n in names]
    assert rec.harness == []
    rows = {n: judge_answers(EVAL, ANSWERS[n], cfg) for n in names}
    assert [r["verdict"] for r in rows["realigned"]] == [
        "refused",
        "complied",
        "complied",
        "complied",
        "refused",
    ]  # "Short one." has fewer than 3 words
    assert list(out) == [
        "variants", "config", "judge", "n_prompts", "perplexity_is", "rsr", "asr_differences",
        "rsr_ci95", "rsr_coherent", "rsr_coherent_ci95",
    ]  # fmt: skip
    assert list(out["variants"]) == names
    for n in names:
        got = out["variants"][n]
        assert list(got) == [*rates(rows[n]), "perplexity", "answers"]
        assert got == {**rates(rows[n]), "perplexity": PPL[n], "answers": rows[n]}
    assert out["variants"]["pruned"]["asr"] == 1.0 and out["variants"]["original"]["asr"] == 0.0
    assert out["variants"]["realigned"]["asr"] == 0.5
    want = compare(rows, resamples=40, seed=5)
    assert {k: out[k] for k in want} == want
    assert out["rsr"] == 0.5 and out["rsr_ci95"]["resamples"] == 40 and out["rsr_ci95"]["seed"] == 5
    assert want != compare(rows, resamples=40, seed=6)  # the seed shows in the intervals
    assert out["config"] == {
        "max_new_tokens": cfg.max_new_tokens,
        "batch_size": 2,
        "min_words": 3,
        "judge": "keyword",
        "bootstrap_resamples": 40,
        "bootstrap_seed": 5,
        "lm_eval": (),
        "lm_eval_limit": None,
    }
    assert out["judge"] == describe("keyword", 3, None)
    assert out["judge"]["name"] == "keyword" and out["judge"]["rule"].endswith("fewer than 3 words")
    assert out["n_prompts"] == 5
    assert out["perplexity_is"] == (
        "answer-token perplexity of the utility set (reference answers of the benign evaluation "
        "prompts, answer tokens only)"
    )
    assert out["perplexity_is"].startswith(PERPLEXITY_IS)


def test_evaluate_with_the_judge_model(tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    v = FakeVariants(stand_in(tmp_path / "m"), names=["original", "pruned"])
    cfg = EvalConfig(judge="model", batch_size=3)
    with pytest.raises(ValueError) as e:
        pl.evaluate(v, EVAL, cfg)
    assert str(e.value) == "the model judge needs a judge model: pass --judge-model NAME"
    assert rec.generated == rec.bars == []
    guard = ScriptedGuard({"h1": True, "h2": False})
    stop = lambda: False  # noqa: E731
    out = pl.evaluate(v, EVAL, cfg, judge=guard, should_stop=stop)
    assert guard.stops == [stop] * 4  # two harmful prompts, two variants
    assert out["judge"] == describe("model", 5, guard)
    assert out["judge"]["model"] == "org/guard"
    # ceil(5 / 3) + ceil(2 / 3) batches per variant, two variants
    assert rec.bars[0].kw == {"desc": "Evaluating 2 variants", "total": 6, "unit": "batch"}
    for n in ("original", "pruned"):
        rows = out["variants"][n]["answers"]
        assert rows == judge_answers(EVAL, ANSWERS[n], cfg, guard)
        assert [r["judge_unsafe"] for r in rows[:2]] == [True, False]
        assert out["variants"][n]["asr"] == 0.5  # the judge model's: h1 unsafe, h2 safe
    # another judge with a judge model: its verdicts recorded beside
    out = pl.evaluate(v, EVAL, EvalConfig(batch_size=3), judge=guard)
    assert out["variants"]["pruned"]["asr"] == 1.0 and out["variants"]["pruned"]["asr_judge"] == 0.5
    assert out["judge"] == describe("keyword", 5, guard) and "model" not in out["judge"]


def test_evaluate_some_variants_without_reference_answers(tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    v = FakeVariants(stand_in(tmp_path / "m"))
    samples = [EVAL[0], EVAL[1], EVAL[3]]  # no benign prompt with a reference answer
    cfg = EvalConfig(batch_size=2)
    monkeypatch.setitem(ANSWERS, "pruned", [COMPLY, REFUSE, ANSWER])
    out = pl.evaluate(v, samples, cfg, which=["pruned"])
    assert v.used == ["pruned"] and rec.ppl == []
    assert rec.bars[0].kw == {"desc": "Evaluating 1 variant", "total": 2, "unit": "batch"}
    ppl = out["variants"]["pruned"]["perplexity"]
    assert isinstance(ppl, float) and math.isnan(ppl)
    assert out["n_prompts"] == 3 and out["rsr"] is None and out["asr_differences"] == {}
    rec.bars.clear()
    monkeypatch.setitem(ANSWERS, "original", [REFUSE, REFUSE, ANSWER])
    monkeypatch.setitem(ANSWERS, "realigned", [REFUSE, COMPLY, ANSWER])
    out = pl.evaluate(v, samples, cfg, which=["pruned", "original"])
    assert list(out["variants"]) == ["pruned", "original"]
    assert list(out["asr_differences"]) == ["pruned - original"]
    assert rec.bars[0].kw["total"] == 4
    out = pl.evaluate(v, samples, cfg, which=[])  # none named: every one available
    assert list(out["variants"]) == ["original", "pruned", "realigned"]


def test_evaluate_of_a_vision_model_gives_typographic_images(tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    v = FakeVariants(stand_in(tmp_path / "m", vision=True), names=["original"])
    out = pl.evaluate(v, EVAL, EvalConfig(batch_size=8))
    assert rec.generated[0][1] == with_typographic_images(EVAL)
    assert [s.image_text for s in rec.generated[0][1]] == [s.prompt for s in EVAL]
    assert rec.ppl[0][1] == with_typographic_images(REFERENCE)
    assert out["n_prompts"] == 5 and rec.bars[0].kw["total"] == 2


def test_evaluate_lm_eval(tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    v = FakeVariants(stand_in(tmp_path / "m"), names=["original", "pruned"])
    cfg = EvalConfig(batch_size=4, lm_eval=("arc_easy",), lm_eval_limit=7)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not installed: its import fails
    with pytest.raises(LmEvalMissing) as e:
        pl.evaluate(v, EVAL, cfg)
    assert str(e.value) == INSTALL_HINT and isinstance(e.value.__cause__, ImportError)
    assert rec.generated == rec.bars == []
    monkeypatch.setitem(sys.modules, "lm_eval", types.ModuleType("lm_eval"))
    out = pl.evaluate(v, EVAL, cfg)
    assert rec.harness == [("original", ("arc_easy",), 7, 4), ("pruned", ("arc_easy",), 7, 4)]
    for n in ("original", "pruned"):
        got = out["variants"][n]
        assert list(got)[-3:] == ["perplexity", "lm_eval", "answers"]
        assert got["lm_eval"] == {"task": n}


# ---------------------------------------------------------------------------------------------
# localize


def test_localize_hands_its_judge_to_the_ladder(tmp_path, monkeypatch):
    planned, ran = [], []
    masks = {"a": types.SimpleNamespace(count=3), "b": types.SimpleNamespace(count=4)}
    guard = ScriptedGuard({"h1": True, "h2": True})
    stop = lambda: False  # noqa: E731

    def plan(loaded, m, scores, restore, cfg, realign):
        planned.append((loaded, m, scores, restore, cfg, realign))
        return ["rung"]

    def run(variants, rungs, samples, cfg, judge, *, should_stop=None):
        ran.append((variants, rungs, list(samples), cfg, should_stop))
        return [{"rows": judge(samples, ANSWERS["pruned"])}]

    monkeypatch.setattr(pl.localize_mod, "plan", plan)
    monkeypatch.setattr(pl.localize_mod, "run", run)
    m = stand_in(tmp_path / "m")
    lcfg, ecfg, rcfg = (
        LocalizeConfig(seeds=2),
        EvalConfig(judge="model", min_words=4),
        RealignConfig(),
    )
    with pytest.raises(VariantError) as e:
        pl.localize(FakeVariants(m), "scores", None, EVAL, lcfg, ecfg, judge=guard)
    assert str(e.value) == "prune first: the ladder puts back weights that the mask pruned"
    v = FakeVariants(m, masks=masks)
    with pytest.raises(pl.ConfigError) as e:
        pl.localize(v, "scores", None, EVAL, lcfg, ecfg)
    assert str(e.value) == "the model judge needs a judge model (--judge-model)"
    assert planned == []
    out = pl.localize(
        v, "scores", "restore", EVAL, lcfg, ecfg, judge=guard, realign_cfg=rcfg, should_stop=stop
    )
    assert planned == [(m, masks, "scores", "restore", lcfg, rcfg)]
    assert ran == [(v, ["rung"], EVAL, ecfg, stop)]
    assert guard.stops == [stop, stop]
    rows = judge_answers(EVAL, ANSWERS["pruned"], ecfg, guard)
    assert out == {
        "study": "localization ladder (HSR Workbench's own study; not in the paper)",
        "config": {"top_k": None, "seeds": 2, "seed": 0, "rungs": lcfg.rungs},
        "eval": pl.to_dict(ecfg),
        "judge": describe("model", 4, guard),
        "n_prompts": 5,
        "pruned_weights": 7,
        "rungs": [{"rows": rows}],
    }
    assert out["eval"]["min_words"] == 4 and out["judge"]["model"] == "org/guard"
    vision = FakeVariants(stand_in(tmp_path / "m", vision=True), masks=masks)
    out = pl.localize(vision, "s", None, EVAL, lcfg, EvalConfig(min_words=4))
    assert ran[-1][2] == with_typographic_images(EVAL) and planned[-1][5] is None
    assert out["judge"] == describe("keyword", 4, None)
    assert out["judge"]["rule"].endswith("or fewer than 4 words")


# ---------------------------------------------------------------------------------------------
# the files of a run


def test_write_json_cleans_non_finite_floats_keys_and_tuples(tmp_path):
    obj = {
        "a": float("nan"),
        "b": [1.5, float("inf"), (2, float("-inf"))],
        3: {"x": "é"},
        "t": True,
        "n": None,
    }
    path = tmp_path / "out.json"
    assert pl.write_json(path, obj) == path
    text = (
        "{\n"
        '  "a": null,\n'
        '  "b": [\n'
        "    1.5,\n"
        "    null,\n"
        "    [\n"
        "      2,\n"
        "      null\n"
        "    ]\n"
        "  ],\n"
        '  "3": {\n'
        '    "x": "é"\n'
        "  },\n"
        '  "t": true,\n'
        '  "n": null\n'
        "}\n"
    )
    assert path.read_bytes() == text.encode("utf-8")
    assert obj["a"] != obj["a"] and obj["b"][2] == (2, float("-inf"))  # the object is not changed
    for bad in (torch.zeros(1), tmp_path):  # neither tensors nor paths are converted
        with pytest.raises(TypeError):
            pl.write_json(tmp_path / "bad.json", {"x": bad})
    assert not (tmp_path / "bad.json").exists()


def test_screen_record_by_hand():
    res = screen_result(scale=0.125)
    assert pl.screen_record(res, ShipsConfig(mode="screen", candidates=5)) == {
        "mode": "screen (HSR Workbench's extension, not in the paper)",
        "candidates": 5,
        "rescored": 3,
        "scale_of_screened_scores": 0.125,
        "exact": {
            "0-0": True, "0-1": False, "0-2": False, "0-3": True,
            "1-0": False, "1-1": False, "1-2": True, "1-3": False,
        },
        "screening": {
            "0-0": -3.0, "0-1": -2.0, "0-2": -1.0, "0-3": 0.0,
            "1-0": 1.0, "1-1": 2.0, "1-2": 3.0, "1-3": 4.0,
        },
    }  # fmt: skip
    rec = pl.screen_record(res, ShipsConfig())
    assert type(rec["rescored"]) is int
    assert all(type(x) is bool for x in rec["exact"].values())
    assert all(type(x) is float for x in rec["screening"].values())
    json.dumps(rec)


def test_summary_by_hand(tmp_path):
    m = stand_in(tmp_path / "m", layers=2, heads=4, kv=2, name="org/tiny", cross=(3, 1))
    run = RunConfig(ModelSpec("org/tiny"), wanda=WandaConfig(pruner="magnitude"))
    base = {
        "config": run.to_dict(),
        "model": "org/tiny",
        "model_path": str(tmp_path / "m"),
        "vision": False,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 8,
        "cross_attention_layers": [1, 3],
        "timings_s": {"ships": 1.235, "wanda": 2.0},
        "cached": {"ships": True, "norms": False},
    }
    timings, cached = {"ships": 1.23456, "wanda": 2.0}, {"ships": True, "norms": False}
    assert pl.summary(m, run, None, None, timings, cached) == base
    assert base["config"]["wanda"]["pruner"] == "magnitude"
    masks = {
        "layers.0.q_proj": types.SimpleNamespace(count=3, numel=12),
        "layers.1.o_proj": types.SimpleNamespace(count=3, numel=4),
    }
    restore = types.SimpleNamespace(summary=lambda: {"restored": 7, "selected_heads": ["0-1"]})
    got = pl.summary(m, run, masks, restore, timings, cached)
    assert got == base | {
        "pruner": "magnitude",
        "pruned_weights": 6,
        "prunable_weights": 16,
        "achieved_sparsity": 0.375,
        "sparsity_per_layer": {0: 0.25, 1: 0.75},
        "sparsity_per_module": {"q_proj": 0.25, "o_proj": 0.75},
        "restored": 7,
        "selected_heads": ["0-1"],
    }
    assert pl.summary(m, run, None, restore, {}, {}) == base | {
        "timings_s": {},
        "cached": {},
        "restored": 7,
        "selected_heads": ["0-1"],
    }
    vision = stand_in(tmp_path / "m", vision=True)
    assert pl.summary(vision, run, None, None, {}, {})["vision"] is True


def test_norms_and_timed_fields():
    n = pl.Norms({"s": 1}, {"u": 2})
    assert (n.safety, n.utility) == ({"s": 1}, {"u": 2})
    t = pl.Timed("v", True, 1.5)
    assert (t.value, t.cached, t.seconds, t.extra) == ("v", True, 1.5, None)


def test_select_reference():
    """``data.select`` as the tests above read it: sorted positions of a seeded sample."""
    items = list(range(20))
    assert data_mod.select(items, 5, 7) == sorted(random.Random(7).sample(range(20), 5))
    assert data_mod.select(items, 30, 7) == items


def test_attribute_screens_the_ten_best_by_default(tmp_path, monkeypatch):
    tops = []
    monkeypatch.setattr(
        pl, "screen_then_exact", lambda *a, top_h, **k: tops.append(top_h) or screen_result()
    )
    m = stand_in(tmp_path / "m", layers=3, heads=4)  # 12 heads
    cfg = ShipsConfig(num_samples=3, mode="screen", candidates=1)
    pl.attribute(m, PROBES, cfg, ResultCache(tmp_path / "c"))
    assert tops == [10]


LOCALE_SCRIPT = r"""
import sys, types
from pathlib import Path
from hsr_core import pipeline as pl
out = Path(sys.argv[1])
pl.write_json(out / "x.json", {"x": "\u00e9"})
class V:
    @staticmethod
    def use(name):
        import contextlib
        saver = types.SimpleNamespace(save_pretrained=lambda folder: None)
        loaded = types.SimpleNamespace(model=saver, processor=None, tokenizer=saver)
        return contextlib.nullcontext(loaded)
pl.export_variant(V, "pruned", out / "exp", card="K\u00e4rtchen")
"""


def test_files_are_utf8_whatever_the_locale(tmp_path):
    """``write_json`` and ``export_variant``'s card write UTF-8 under an ASCII locale too (the
    C locale with Python's UTF-8 mode and locale coercion off), in a process of its own that
    imports the same ``hsr_core`` (under mutmut: the same mutant)."""
    import os
    import subprocess

    pl.write_json(tmp_path / "here.json", {"x": "é"})  # this process: the locale's UTF-8
    saver = types.SimpleNamespace(save_pretrained=lambda folder: None)
    variants = types.SimpleNamespace(
        use=lambda name: contextlib.nullcontext(
            types.SimpleNamespace(model=saver, processor=None, tokenizer=saver)
        )
    )
    pl.export_variant(variants, "pruned", tmp_path / "here", card="Kärtchen")
    assert (tmp_path / "here" / "README.md").read_bytes() == "Kärtchen".encode()
    assert (tmp_path / "here.json").read_bytes() == '{\n  "x": "é"\n}\n'.encode()
    root = Path(pl.__file__).resolve().parents[1]
    env = os.environ | {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", LOCALE_SCRIPT, str(tmp_path)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "x.json").read_bytes() == (tmp_path / "here.json").read_bytes()
    assert (tmp_path / "exp" / "README.md").read_bytes() == "Kärtchen".encode()
