"""Ships attribution: the batched layer-replay way against the naive loop, and ablation modes."""

from __future__ import annotations

import math

import pytest
import torch

from hsr_core.config import ShipsConfig
from hsr_core.data import Sample, builtin_calibration, with_typographic_images
from hsr_core.encoding import encode_one
from hsr_core.heads import all_heads, top_heads
from hsr_core.hooks import HookSet, count_hooks, head_ablation, record_layers
from hsr_core.ships import (
    ablated_finals,
    principal_angle_sum,
    read_heads_jsonl,
    ships_scores,
    write_heads_jsonl,
)


def probes(loaded, n: int = 4) -> list[Sample]:
    prompts = [Sample(s.prompt) for s in builtin_calibration().safety[:n]]
    return with_typographic_images(prompts) if loaded.is_vision else prompts


def naive_final(loaded, sample: Sample, heads=(), mode: str = "zero") -> torch.Tensor:
    """One full forward pass with the given heads ablated; final-norm state at the last token."""
    inputs, _, _ = encode_one(loaded, sample, with_response=False)
    with head_ablation(loaded.adapter, list(heads), mode), torch.inference_mode():
        out = loaded.model(**inputs, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1][0, -1].float()


def naive_scores(loaded, samples, r_main: int = 1, mode: str = "zero") -> torch.Tensor:
    a = loaded.adapter
    M = torch.stack([naive_final(loaded, s) for s in samples])
    heads = all_heads(a.num_layers, a.num_heads)
    M_A = torch.stack(
        [torch.stack([naive_final(loaded, s, [hd], mode) for s in samples]) for hd in heads]
    )
    return principal_angle_sum(M, M_A, r_main).float().view(a.num_layers, a.num_heads)


@pytest.mark.parametrize("mode", ["zero", "uniform"])
def test_batched_replay_equals_naive_loop(any_tiny, mode):
    loaded = any_tiny
    a = loaded.adapter
    for sample in probes(loaded, 2):
        inputs, _, _ = encode_one(loaded, sample, with_response=False)
        record = record_layers(loaded.model, a, inputs)
        heads = all_heads(a.num_layers, a.num_heads)
        # batch size 3 makes batches that span layers and grow during the replay
        fast = ablated_finals(loaded, record, heads, mode=mode, batch_size=3).float()
        slow = torch.stack([naive_final(loaded, sample, [hd], mode) for hd in heads])
        assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-4)
        assert torch.allclose(record.final[0, -1].float(), naive_final(loaded, sample), atol=1e-6)
        # the ablation changes something for every head
        assert (fast - record.final[0, -1]).abs().amax(dim=1).min() > 0


@pytest.mark.parametrize("r_main", [1, 2])
def test_ships_scores_equal_naive(any_tiny, r_main):
    loaded = any_tiny
    samples = probes(loaded, 4)
    before = count_hooks(loaded.model)
    fast = ships_scores(loaded, samples, ShipsConfig(num_samples=4, r_main=r_main, batch_size=5))
    assert count_hooks(loaded.model) == before  # every hook of ours is gone
    slow = naive_scores(loaded, samples, r_main)
    assert fast.shape == (loaded.adapter.num_layers, loaded.adapter.num_heads)
    assert torch.allclose(fast, slow, atol=1e-3)
    assert (fast > 0).all()


def test_kl_metric_equals_naive(tiny_llama):
    loaded = tiny_llama
    samples = probes(loaded, 3)
    fast = ships_scores(loaded, samples, ShipsConfig(num_samples=3, metric="kl"))
    a = loaded.adapter
    slow = torch.zeros(a.num_layers, a.num_heads, dtype=torch.float64)
    with torch.no_grad():
        for s in samples:
            p = torch.log_softmax(a.lm_head(naive_final(loaded, s)).double(), -1)
            for l, h in all_heads(a.num_layers, a.num_heads):
                q = torch.log_softmax(a.lm_head(naive_final(loaded, s, [(l, h)])).double(), -1)
                slow[l, h] += (p.exp() * (p - q)).sum() / len(samples)
    assert torch.allclose(fast.double(), slow, rtol=1e-3, atol=1e-9)


def _qkv_scaling(loaded, heads, eps: float, which=("q", "k", "v")):
    """The reference's ablation: scale the head's query (and key, value) by eps."""
    a = loaded.adapter
    hooks = HookSet()
    for l, h in heads:
        attn = a.attention(l)
        for proj in which:
            idx = h if proj == "q" else h // a.group_size
            d = a.head_dim

            def scale(_m, _i, out, idx=idx, d=d):
                out = out.clone()
                out[..., idx * d : (idx + 1) * d] *= eps
                return out

            hooks.post(getattr(attn, f"{proj}_proj"), scale)
    return hooks


def test_zero_ablation_matches_qkv_scaling(tiny_mha):
    # with MHA, scaling q, k and v of one head by eps removes that head's output up to O(eps)
    loaded = tiny_mha
    sample = probes(loaded, 1)[0]
    inputs, _, _ = encode_one(loaded, sample, with_response=False)
    for head in [(0, 1), (1, 3)]:
        with _qkv_scaling(loaded, [head], 1e-5), torch.inference_mode():
            ref = loaded.model(**inputs, output_hidden_states=True).hidden_states[-1][0, -1]
        assert torch.allclose(naive_final(loaded, sample, [head], "zero"), ref, atol=1e-4)


def test_uniform_ablation_matches_query_scaling(any_tiny):
    # scaling only the query by a tiny eps makes the head's attention uniform over the prefix
    loaded = any_tiny
    sample = probes(loaded, 1)[0]
    inputs, _, _ = encode_one(loaded, sample, with_response=False)
    for head in [(0, 0), (1, 3)]:
        with _qkv_scaling(loaded, [head], 1e-7, which=("q",)), torch.inference_mode():
            ref = loaded.model(**inputs, output_hidden_states=True).hidden_states[-1][0, -1]
        uniform = naive_final(loaded, sample, [head], "uniform")
        zero = naive_final(loaded, sample, [head], "zero")
        assert torch.allclose(uniform, ref, atol=1e-4)
        assert not torch.allclose(zero, ref, atol=1e-4)  # the two modes really differ


def test_gqa_ablates_one_query_head_not_its_group(tiny_llama):
    a = tiny_llama.adapter
    assert a.num_kv_heads < a.num_heads
    seen = {}

    def grab(_m, args):
        seen["x"] = args[0].clone()

    x = torch.randn(1, 5, a.hidden_size)
    with head_ablation(a, [(0, 1)]), HookSet() as hooks:
        hooks.pre(a.attention(0).o_proj, grab)  # runs after the ablation hook
        a.layers[0](x, **_layer_kwargs(tiny_llama, x))
    d = a.head_dim
    heads = seen["x"].view(1, 5, a.num_heads, d)
    assert (heads[:, :, 1] == 0).all()
    for other in (0, 2, 3):  # head 0 shares head 1's KV group and is untouched
        assert heads[:, :, other].abs().sum() > 0


def _layer_kwargs(loaded, x):
    pos = torch.arange(x.shape[1])[None]
    rotary = loaded.model.model.rotary_emb(x, pos)
    return {"position_embeddings": rotary, "attention_mask": None, "position_ids": pos}


def test_principal_angles_against_direct_formula():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(6, 20, generator=g, dtype=torch.float64)
    M_A = M + 0.3 * torch.randn(5, 6, 20, generator=g, dtype=torch.float64)
    got = principal_angle_sum(M, M_A, r_main=1)
    u = torch.linalg.svd(M).U[:, 0]
    for i in range(5):
        ua = torch.linalg.svd(M_A[i]).U[:, 0]
        assert math.isclose(
            got[i].item(), math.degrees(math.acos(min(1.0, abs(float(u @ ua))))), abs_tol=1e-6
        )
    got3 = principal_angle_sum(M, M_A, r_main=3)
    U = torch.linalg.svd(M).U
    for i in range(5):
        UA = torch.linalg.svd(M_A[i]).U
        expected = sum(
            math.degrees(
                math.acos(min(1.0, torch.linalg.svdvals(U[:, :r].T @ UA[:, :r]).min().item()))
            )
            for r in (1, 2, 3)
        )
        assert math.isclose(got3[i].item(), expected, abs_tol=1e-5)
    assert torch.allclose(
        principal_angle_sum(M, M[None].repeat(2, 1, 1)),
        torch.zeros(2, dtype=torch.float64),
        atol=1e-6,
    )


def test_hooks_removed_even_on_error(tiny_llama):
    a = tiny_llama.adapter
    assert count_hooks(tiny_llama.model) == 0
    with pytest.raises(RuntimeError, match="boom"), head_ablation(a, [(0, 0), (1, 2)], "uniform"):
        assert count_hooks(tiny_llama.model) == 4  # o_proj pre-hooks and v_proj hooks
        raise RuntimeError("boom")
    assert count_hooks(tiny_llama.model) == 0


def test_heads_jsonl_roundtrip_and_top_heads(tmp_path):
    scores = torch.tensor([[0.5, 3.0, 1.0], [2.0, 3.0, 0.1]])
    path = write_heads_jsonl(scores, tmp_path / "heads.jsonl")
    row = path.read_text().strip()
    assert row.startswith("{") and '"1-2": 0.1' in row.replace("0.10000000149011612", "0.1")
    assert torch.equal(read_heads_jsonl(path, 2, 3), scores)
    assert top_heads(scores, 3) == [(0, 1), (1, 1), (1, 0)]  # ties broken by position
    with pytest.raises(ValueError, match="outside"):
        read_heads_jsonl(path, 1, 3)


def test_angle_metric_needs_two_prompts(tiny_llama):
    with pytest.raises(ValueError, match="at least 2"):
        ships_scores(tiny_llama, probes(tiny_llama, 1), ShipsConfig(num_samples=1))


def test_out_of_memory_halves_the_batch(tiny_llama, monkeypatch):
    import hsr_core.ships as ships_mod

    real = ships_mod.run_layer
    sizes = []

    def picky(layer, hidden, kwargs):
        sizes.append(hidden.shape[0])
        if hidden.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(layer, hidden, kwargs)

    samples = probes(tiny_llama, 2)
    expected = ships_scores(tiny_llama, samples, ShipsConfig(num_samples=2, batch_size=8))
    monkeypatch.setattr(ships_mod, "run_layer", picky)
    got = ships_scores(tiny_llama, samples, ShipsConfig(num_samples=2, batch_size=8))
    assert torch.allclose(got, expected, atol=1e-4)
    assert max(sizes) > 2 and sizes[-1] <= 2


def test_the_bar_moves_inside_each_prompt(tiny_llama, monkeypatch):
    """The bar advances after every replay batch, not only after a whole prompt: a prompt of a
    large model takes tens of seconds, and the page stood at 0% until the first one ended
    (issue 17). Counted through tqdm itself: the updates before the first prompt is done."""
    from hsr_core import progress

    seen: list[float] = []

    class Recording(progress.tqdm):
        def update(self, n=1):
            out = super().update(n)
            seen.append(self.n)
            return out

    monkeypatch.setattr(progress, "tqdm", Recording)
    loaded = tiny_llama
    heads = loaded.adapter.num_layers * loaded.adapter.num_heads
    batch = heads // 4  # four replay batches a prompt
    samples = probes(loaded, 3)
    scores = ships_scores(loaded, samples, ShipsConfig(num_samples=3, batch_size=batch))
    inside_first = [n for n in seen if n < 1]
    assert inside_first == pytest.approx([0.25, 0.5, 0.75])
    assert seen[-1] == pytest.approx(3)  # whole prompts at the end
    assert seen == sorted(seen)  # never backwards
    # the bar changes nothing: the same scores in one batch a prompt
    whole = ships_scores(loaded, samples, ShipsConfig(num_samples=3, batch_size=heads))
    assert torch.allclose(scores, whole, atol=1e-4)


def test_a_fractional_count_is_printed_with_one_decimal():
    """The bar of ``progress.steps`` shows ``0.3/3`` inside the first item, not 0.333...3/3."""
    from tqdm.auto import tqdm

    from hsr_core.progress import steps

    items = steps(["a", "b", "c"], desc="one decimal")
    _, advance = next(items)
    advance(1 / 3)
    shown = [str(b) for b in list(tqdm._instances) if b.desc.startswith("one decimal")]
    items.close()
    assert len(shown) == 1 and "0.3/3" in shown[0] and "0.333" not in shown[0], shown
