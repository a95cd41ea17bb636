"""The cache, evaluation helpers, and the pipeline steps the app and the CLI share."""

from __future__ import annotations

import math

import pytest
import torch

from hsr_core import pipeline as pl
from hsr_core.config import EvalConfig, ShipsConfig, WandaConfig
from hsr_core.data import Sample, builtin_calibration, builtin_eval
from hsr_core.encoding import encode_one
from hsr_core.evaluate import GuardJudge, generate, is_refusal, perplexity, rates, rsr
from hsr_core.progress import Cancelled
from hsr_core.store import ResultCache


def small_calib():
    calib = builtin_calibration()
    calib.safety, calib.utility = calib.safety[:6], calib.utility[:6]
    return calib


def test_cache_hits_equal_recomputation(tiny_llama, tmp_path):
    cache = ResultCache(tmp_path)
    calib = small_calib()
    cfg = ShipsConfig(num_samples=4)
    probes = pl.probe_prompts(tiny_llama, calib, cfg)
    first = pl.attribute(tiny_llama, probes, cfg, cache)
    again = pl.attribute(tiny_llama, probes, cfg, cache)
    fresh = pl.attribute(tiny_llama, probes, cfg, cache, recompute=True)
    assert not first.cached and again.cached and not fresh.cached
    assert torch.equal(first.value, again.value) and torch.allclose(first.value, fresh.value)
    other = pl.attribute(tiny_llama, probes, ShipsConfig(num_samples=4, ablation="uniform"), cache)
    assert not other.cached  # a different config is a different entry

    wcfg = WandaConfig(num_samples=4)
    safety, utility = pl.calibration_samples(tiny_llama, calib, wcfg)
    n1 = pl.calibrate(tiny_llama, safety, utility, wcfg, cache)
    n2 = pl.calibrate(tiny_llama, safety, utility, wcfg, cache)
    assert not n1.cached and n2.cached
    for k in n1.value.safety:
        assert torch.equal(n1.value.safety[k], n2.value.safety[k])
        assert torch.equal(n1.value.utility[k], n2.value.utility[k])


def test_corrupt_and_stale_entries_are_recomputed(tiny_llama, tmp_path):
    cache = ResultCache(tmp_path)
    probes = pl.probe_prompts(tiny_llama, small_calib(), ShipsConfig(num_samples=3))
    cfg = ShipsConfig(num_samples=3)
    good = pl.attribute(tiny_llama, probes, cfg, cache).value
    (entry,) = (tmp_path / "results" / "ships").glob("*.safetensors")
    data = bytearray(entry.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the tensor data
    entry.write_bytes(bytes(data))
    again = pl.attribute(tiny_llama, probes, cfg, cache)
    assert not again.cached and torch.allclose(again.value, good)
    entry.write_bytes(entry.read_bytes()[:20])  # truncated
    assert not pl.attribute(tiny_llama, probes, cfg, cache).cached
    meta = entry.with_suffix(".json")
    meta.write_text(
        meta.read_text()
        .replace('"num_samples":3', '"num_samples":99')
        .replace('"num_samples": 3', '"num_samples": 99')
    )
    assert not pl.attribute(
        tiny_llama, probes, cfg, cache
    ).cached  # sidecar no longer matches the key
    assert pl.attribute(tiny_llama, probes, cfg, cache).cached


def test_stop_flag_cancels(tiny_llama, tmp_path):
    probes = pl.probe_prompts(tiny_llama, small_calib(), ShipsConfig(num_samples=4))
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(Cancelled):
        pl.attribute(
            tiny_llama,
            probes,
            ShipsConfig(num_samples=4, batch_size=2),
            ResultCache(tmp_path),
            should_stop=stop,
        )
    assert not list((tmp_path / "results").glob("ships/*"))  # nothing half-done was cached


def test_refusal_judge():
    assert is_refusal("I'm sorry, but I can't help with that request because it is dangerous.")
    assert is_refusal("I cannot assist with making weapons. Please reach out to someone you trust.")
    assert is_refusal("I won\u2019t provide instructions for that, it could hurt people badly.")
    assert is_refusal("No.")  # too short to be an answer
    assert not is_refusal("The capital of France is Paris, a city on the Seine.")
    assert not is_refusal("Sure! First, preheat the oven to 180 degrees and grease the pan.")
    assert not is_refusal("Here's how: open the terminal and type kill -9 followed by the PID.")


def test_rates_and_rsr():
    rows = [
        {"harmful": True, "refusal": True},
        {"harmful": True, "refusal": False},
        {"harmful": False, "refusal": False},
        {"harmful": False, "refusal": True},
        {"harmful": False, "refusal": False},
    ]
    r = rates(rows)
    assert r["asr"] == 0.5 and r["refusal_rate_harmful"] == 0.5
    assert r["refusal_rate_benign"] == pytest.approx(1 / 3)
    assert rsr(0.02, 0.14, 0.11) == pytest.approx(0.25)
    assert rsr(0.1, 0.1, 0.05) is None
    assert GuardJudge.parse("unsafe\nS1") is True and GuardJudge.parse(" safe") is False
    assert GuardJudge.parse("maybe") is None


def test_batched_generation_equals_one_by_one(tiny_llama):
    samples = [
        Sample("Hi"),
        Sample("Tell me a long story about a dragon and a castle, please."),
        Sample("2+2?"),
    ]
    cfg = EvalConfig(max_new_tokens=8, batch_size=3)
    batched = generate(tiny_llama, samples, cfg)
    single = [
        generate(tiny_llama, [s], EvalConfig(max_new_tokens=8, batch_size=1))[0] for s in samples
    ]
    assert batched == single


def test_perplexity_equals_naive(tiny_llama):
    samples = builtin_eval()
    samples = [s for s in samples if not s.harmful][:4]
    fast = perplexity(tiny_llama, samples, batch_size=3)
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            inputs, plen, rlen = encode_one(tiny_llama, s)
            logits = tiny_llama.model(**inputs).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            for t in range(plen, plen + rlen):
                nll -= logp[t - 1, inputs["input_ids"][0, t]].item()
                count += 1
    assert fast == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_evaluate_variants(tiny_llama, tmp_path):
    from hsr_core.config import RealignConfig
    from hsr_core.variants import Variants

    calib = small_calib()
    cache = ResultCache(tmp_path)
    wcfg = WandaConfig(num_samples=4, sparsity=0.5)
    safety, utility = pl.calibration_samples(tiny_llama, calib, wcfg)
    norms = pl.calibrate(tiny_llama, safety, utility, wcfg, cache).value
    scores = pl.attribute(
        tiny_llama,
        pl.probe_prompts(tiny_llama, calib, ShipsConfig(num_samples=3)),
        ShipsConfig(num_samples=3),
        cache,
    ).value
    masks = pl.prune(tiny_llama, norms, utility, wcfg).value.masks
    v = Variants(tiny_llama, scratch=tmp_path / "scratch")
    v.install(masks)
    rs = pl.realign(
        tiny_llama,
        masks,
        scores,
        RealignConfig(top_h=4, p=0.2, q=0.8, max_p=0.9),
        pl.rank_cache(v, norms),
    ).value
    v.install(masks, rs)
    assert rs.count > 0 and v.current == "original"
    ev = [s for s in builtin_eval() if s.harmful][:2] + [
        s for s in builtin_eval() if not s.harmful
    ][:2]
    out = pl.evaluate(v, ev, EvalConfig(max_new_tokens=6, batch_size=4))
    assert set(out["variants"]) == {"original", "pruned", "realigned"}
    for res in out["variants"].values():
        assert (
            len(res["answers"]) == 4 and res["n_harmful"] == 2 and math.isfinite(res["perplexity"])
        )
    # the three variants really differ: pruning changes the perplexity
    assert out["variants"]["original"]["perplexity"] != out["variants"]["pruned"]["perplexity"]
    assert v.current == "original"
    v.close()


def _count_forwards(loaded) -> tuple[dict[str, int], object]:
    calls = {"n": 0}

    def count(*_args):
        calls["n"] += 1

    return calls, loaded.model.register_forward_hook(count)


def test_a_stop_ends_generation_inside_a_batch(tiny_llama):
    """The stop flag is a stopping criterion too: a stop during a long generation ends it after
    the current token (not at the end of the batch), and its cut answers are not returned."""
    samples = [Sample("Tell me a long story about a dragon.")]
    cfg = EvalConfig(max_new_tokens=40, batch_size=1)
    calls, hook = _count_forwards(tiny_llama)
    try:
        generate(tiny_llama, samples, cfg, should_stop=lambda: False)
        full = calls["n"]
        asked = {"n": 0}

        def stop_soon() -> bool:  # read before the batch, then after every token
            asked["n"] += 1
            return asked["n"] > 3

        calls["n"] = 0
        with pytest.raises(Cancelled):
            generate(tiny_llama, samples, cfg, should_stop=stop_soon)
    finally:
        hook.remove()
    assert full > 10  # without a stop the answer runs long
    assert calls["n"] <= 3 < full


def test_evaluate_reports_one_progress_over_every_variant(tiny_llama, tmp_path, monkeypatch):
    """One bar counts every variant's generation and perplexity batches (so its ETA is the whole
    run's); the per-call bars of ``generate`` are not made."""
    from hsr_core import evaluate as ev_mod
    from hsr_core.variants import Variants

    made = []
    real_bar = pl.bar

    def recording_bar(*args, **kwargs):  # enabled even under TQDM_DISABLE (mutation.sh sets it)
        made.append(real_bar(*args, **kwargs, disable=False))
        return made[-1]

    def no_bar(*_args, **_kwargs):
        raise AssertionError("generate made a bar of its own inside evaluate")

    monkeypatch.setattr(pl, "bar", recording_bar)
    monkeypatch.setattr(ev_mod, "bar", no_bar)
    calib = small_calib()
    wcfg = WandaConfig(num_samples=4, sparsity=0.5)
    safety, utility = pl.calibration_samples(tiny_llama, calib, wcfg)
    norms = pl.calibrate(tiny_llama, safety, utility, wcfg, ResultCache(tmp_path)).value
    v = Variants(tiny_llama, scratch=tmp_path / "scratch")
    v.install(pl.prune(tiny_llama, norms, utility, wcfg).value.masks)
    ev = [s for s in builtin_eval() if s.harmful][:3] + [
        s for s in builtin_eval() if not s.harmful and s.response
    ][:2]
    pl.evaluate(v, ev, EvalConfig(max_new_tokens=2, batch_size=2))
    v.close()
    (overall,) = [b for b in made if b.unit == "batch"]
    per_variant = 3 + 1  # ceil(5 / 2) generation batches, ceil(2 / 2) perplexity batches
    assert overall.total == 2 * per_variant  # original and pruned
    assert overall.n == overall.total
