"""Ships screening (our extension): the first-order estimates against finite differences of
their surrogates, the perturbation formula against exact principal angles, and screening
mode's re-scored heads and ranking against exact Ships."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from hsr_core import pipeline as pl
from hsr_core.__main__ import main
from hsr_core.config import ConfigError, ShipsConfig
from hsr_core.data import Sample, builtin_calibration, with_typographic_images
from hsr_core.encoding import encode_one
from hsr_core.heads import all_heads, top_heads
from hsr_core.hooks import HookSet, count_hooks
from hsr_core.screen import (
    angle_estimate,
    directional_effects,
    fisher_directions,
    merge_ranking,
    screen_scores,
    screen_then_exact,
    tracked_pass,
)
from hsr_core.ships import principal_angle_sum, ships_scores
from hsr_core.store import ResultCache


def probes(loaded, n: int = 4) -> list[Sample]:
    prompts = [Sample(s.prompt) for s in builtin_calibration().safety[:n]]
    return with_typographic_images(prompts) if loaded.is_vision else prompts


def scaled_final(loaded, sample: Sample, head: tuple[int, int], eps: float, mode: str):
    """Final-norm state at the last token with head ``head``'s slice moved ``eps`` of the way
    to its ablated value (written out here, apart from the code under test)."""
    a = loaded.adapter
    layer, h = head
    d_h, group = a.head_dim, a.num_heads // a.num_kv_heads
    attn = a.attention(layer)
    seen: dict[str, torch.Tensor] = {}

    cross = a.layer_kind(layer) == "cross"

    def grab(_m, _i, v):
        seen["v"] = v

    def grab_mask(_m, _args, kw):
        seen["mask"] = kw.get("attention_mask")

    def move(_m, args):
        x = args[0].clone()
        z = x[..., h * d_h : (h + 1) * d_h]
        if mode == "zero":
            target = torch.zeros_like(z)
        elif cross:  # Mllama: mean over the vision tokens each text token may see
            kv = h // group
            v = seen["v"].reshape(-1, a.num_kv_heads, d_h)[:, kv]  # [vision, d_h]
            mask = seen["mask"][0, 0]  # [seq, vision], additive (0: may look)
            rows = []
            for t in range(z.shape[1]):
                ok = mask[t] == 0 if mask.dtype != torch.bool else mask[t]
                rows.append(v[ok].mean(0) if ok.any() else torch.zeros_like(v[0]))
            target = torch.stack(rows)[None]
        else:
            kv = h // group
            v = seen["v"][..., kv * d_h : (kv + 1) * d_h]  # [1, seq, d_h]
            target = torch.stack([v[:, : t + 1].mean(dim=1) for t in range(v.shape[1])], dim=1)
        x[..., h * d_h : (h + 1) * d_h] = z + eps * (target - z)
        return (x, *args[1:])

    inputs, _, _ = encode_one(loaded, sample, with_response=False)
    with HookSet() as hooks, torch.inference_mode():
        hooks.post(attn.v_proj, grab)
        if cross:
            hooks.pre(attn, grab_mask, with_kwargs=True)
        hooks.pre(attn.o_proj, move)
        out = loaded.model(**inputs, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1][0, -1].double()


def central_difference(loaded, sample, head, mode, eps: float = 2e-2) -> torch.Tensor:
    """d f / d eps at eps = 0: the first-order change of the final state ``[hidden]``, by
    central differences with one Richardson step (error O(eps^4); transformers' RMSNorm
    computes in float32 even in a float64 model, so eps cannot be tiny)."""

    def central(e: float) -> torch.Tensor:
        plus = scaled_final(loaded, sample, head, e, mode)
        minus = scaled_final(loaded, sample, head, -e, mode)
        return (plus - minus) / (2 * e)

    return (4 * central(eps / 2) - central(eps)) / 3


@pytest.mark.parametrize("mode", ["zero", "uniform"])
def test_directional_effects_equal_finite_differences(any_tiny, mode):
    loaded = any_tiny
    loaded.model.double()
    a = loaded.adapter
    torch.manual_seed(1)
    C = torch.randn(2, a.hidden_size, dtype=torch.float64)
    before = count_hooks(loaded.model)
    for sample in probes(loaded, 2):
        inputs, _, _ = encode_one(loaded, sample, with_response=False)
        got = directional_effects(tracked_pass(loaded, inputs, mode), C)  # [2, L, H]
        assert count_hooks(loaded.model) == before
        heads = all_heads(a.num_layers, a.num_heads)
        want = torch.stack([C @ central_difference(loaded, sample, hd, mode) for hd in heads], 1)
        # the differences carry float32 noise (~1e-4 of the largest effect on LLaVA)
        tol = 1e-3 * float(want.abs().max())
        assert torch.allclose(got.view(2, -1), want, rtol=1e-3, atol=tol), (got, want)
        assert tol > 0


def test_angle_estimate_is_the_first_order_principal_angle():
    """Perturbations along v_1 only (``E = t v_1^T``) make the left-out term vanish, so the
    estimate must equal the exact angle to first order; also with more prompts than the
    hidden size (the null space of ``M M^T``) and for r_main = 2."""
    torch.manual_seed(0)
    for N, d, r_main in [(6, 9, 1), (6, 9, 2), (7, 4, 1)]:
        M = torch.randn(N, d, dtype=torch.float64) + 2.0 * torch.randn(1, d, dtype=torch.float64)
        V = torch.linalg.svd(M, full_matrices=False).Vh  # [k, d]
        heads = 5
        t = torch.randn(heads, N, dtype=torch.float64)
        for eps in (1e-4, 1e-5):
            E = eps * torch.einsum("hn,d->hnd", t, V[0])  # [heads, N, d]
            exact = principal_angle_sum(M, M[None] + E, r_main)
            T = torch.einsum("hnd,jd->jnh", E, V[:r_main])  # [r_main, N, heads]
            est = angle_estimate(M, T, r_main)
            assert torch.allclose(est, exact, rtol=10 * eps), (N, d, r_main, est, exact)
        assert (exact > 0).all()


def reference_angle(M: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """r_main = 1 with N <= d: ``degrees(atan |P t|)``, ``P = sum_k s_1 u_k u_k^T / (s_1^2 - s_k^2)``."""
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    P = sum(
        S[0] / (S[0] ** 2 - S[k] ** 2) * torch.outer(U[:, k], U[:, k]) for k in range(1, len(S))
    )
    return torch.rad2deg(torch.atan((P @ t).norm(dim=0)))


def intact_finals(loaded, samples) -> torch.Tensor:
    return torch.stack([scaled_final(loaded, s, (0, 0), 0.0, "zero") for s in samples])


@pytest.mark.parametrize("mode", ["zero", "uniform"])
def test_angle_screening_equals_finite_differences_of_its_surrogate(tiny_mha, mode):
    loaded = tiny_mha
    loaded.model.double()
    a = loaded.adapter
    samples = probes(loaded, 4)
    M = intact_finals(loaded, samples)
    v1 = torch.linalg.svd(M, full_matrices=False).Vh[0]
    heads = all_heads(a.num_layers, a.num_heads)
    # t[i, h]: first-order change of v_1 . f_i under head h's ablation, by central differences
    t = torch.stack(
        [
            torch.stack([v1 @ central_difference(loaded, s, hd, mode) for hd in heads])
            for s in samples
        ]
    )
    want = reference_angle(M, t).float().view(a.num_layers, a.num_heads)
    got = screen_scores(loaded, samples, ShipsConfig(num_samples=4, ablation=mode))
    assert got.shape == (a.num_layers, a.num_heads)
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.max())), (got, want)


def test_kl_screening_equals_the_second_order_of_kl(tiny_llama):
    """With every token and every Fisher direction kept, the KL estimate is the exact
    second-order coefficient of KL(p || p_eps) of an eps-scaled ablation."""
    loaded = tiny_llama
    loaded.model.double()
    a = loaded.adapter
    samples = probes(loaded, 2)
    vocab = a.lm_head.weight.shape[0]
    cfg = ShipsConfig(num_samples=2, metric="kl")
    got = screen_scores(loaded, samples, cfg, kl_directions=a.hidden_size, top_tokens=vocab)

    def kl(s: Sample, hd, eps: float) -> float:
        f, f_eps = (
            scaled_final(loaded, s, (0, 0), 0.0, "zero"),
            scaled_final(loaded, s, hd, eps, "zero"),
        )
        with torch.inference_mode():
            logp = torch.log_softmax(a.lm_head(f), -1)
            logq = torch.log_softmax(a.lm_head(f_eps), -1)
            return float((logp.exp() * (logp - logq)).sum())

    def second_order(s: Sample, hd, eps: float = 2e-2) -> float:
        """KL = c eps^2 + O(eps^3): c by symmetric differences and one Richardson step."""
        sym = [(kl(s, hd, e) + kl(s, hd, -e)) / (2 * e**2) for e in (eps, eps / 2)]
        return (4 * sym[1] - sym[0]) / 3

    want = torch.zeros(a.num_layers, a.num_heads, dtype=torch.float64)
    for s in samples:
        for hd in all_heads(a.num_layers, a.num_heads):
            want[hd] += second_order(s, hd) / len(samples)
    assert torch.allclose(got.double(), want, rtol=1e-3), (got, want)
    # fewer directions give less (a truncated sum of non-negative terms), never more
    one = screen_scores(loaded, samples, cfg, kl_directions=1, top_tokens=vocab)
    assert (one <= got * (1 + 1e-5)).all() and (one > 0).all()


def test_fisher_directions_are_the_logit_fisher_matrix():
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 11, bias=True, dtype=torch.float64)  # the bias cancels
    loaded = SimpleNamespace(adapter=SimpleNamespace(lm_head=head))
    f = torch.randn(5, dtype=torch.float64)
    p = torch.softmax(head(f[None])[0], -1).detach()
    W = head.weight.detach()
    A = W.T @ (torch.diag(p) - torch.outer(p, p)) @ W  # [5, 5]
    lam, q = fisher_directions(loaded, f, top_tokens=11, directions=5)
    assert torch.allclose(q.T @ torch.diag(lam) @ q, A, atol=1e-10)
    assert (lam[:-1] >= lam[1:]).all()


def test_rescored_candidates_equal_exact_ships(tiny_llama):
    loaded = tiny_llama
    samples = probes(loaded, 3)
    cfg = ShipsConfig(num_samples=3, candidates=2, batch_size=3)
    res = screen_then_exact(loaded, samples, cfg, top_h=2)
    exact_all = ships_scores(loaded, samples, cfg)
    screening = screen_scores(loaded, samples, cfg)
    picked = set(top_heads(screening, 4))
    assert set(top_heads(res.exact.float(), 4)) == picked and int(res.exact.sum()) == 4
    assert torch.equal(res.screening, screening)
    for hd in picked:
        assert math.isclose(float(res.scores[hd]), float(exact_all[hd]), rel_tol=1e-5)
    # ranking: the exact heads first, by exact score; the others below, in screening order
    ranked = top_heads(res.scores)
    assert ranked[:4] == sorted(picked, key=lambda h: (-float(exact_all[h]), h))
    rest = [h for h in top_heads(screening) if h not in picked]
    assert ranked[4:] == rest
    assert float(res.scores[ranked[4]]) < float(res.scores[ranked[3]])


def test_merge_ranking_scales_or_shifts_the_screened_heads_below():
    torch.manual_seed(0)
    screening = torch.rand(3, 4) + 0.5
    exact = torch.full((3, 4), math.nan)
    exact[0, 1], exact[2, 3] = 0.2, 0.9  # below some screening estimates: scaled down
    res = merge_ranking(screening, exact)
    others = ~res.exact
    assert res.scale < 1 and float(res.scores[others].max()) < 0.2
    assert torch.allclose(res.scores[others], screening[others] * res.scale, rtol=1e-5)
    assert top_heads(res.scores, 2) == [(2, 3), (0, 1)]
    # already below: kept as they are
    low = merge_ranking(screening * 0.1, exact)
    assert low.scale == 1 and torch.equal(low.scores[others], (screening * 0.1)[others])
    # an exact score of 0: shifted below it, order kept
    exact[0, 1] = 0.0
    shifted = merge_ranking(screening, exact)
    assert float(shifted.scores[others].max()) < 0
    order = top_heads(torch.where(others, screening, torch.tensor(math.nan)))[: int(others.sum())]
    assert top_heads(shifted.scores)[2:] == order
    with pytest.raises(ValueError, match="exact"):
        merge_ranking(screening, torch.full((3, 4), math.nan))


def test_pipeline_screen_mode_is_cached_under_its_own_key(tiny_llama, tmp_path):
    cache = ResultCache(tmp_path)
    exact_cfg = ShipsConfig(num_samples=3)
    samples = pl.probe_prompts(tiny_llama, builtin_calibration(), exact_cfg)
    exact = pl.attribute(tiny_llama, samples, exact_cfg, cache)
    assert exact.extra is None
    screen_cfg = ShipsConfig(num_samples=3, mode="screen", candidates=1)
    first = pl.attribute(tiny_llama, samples, screen_cfg, cache, top_h=3)
    assert not first.cached and int(first.extra.exact.sum()) == 3
    again = pl.attribute(tiny_llama, samples, screen_cfg, cache, top_h=3)
    assert again.cached and torch.equal(again.value, first.value)
    assert (
        torch.equal(again.extra.exact, first.extra.exact) and again.extra.scale == first.extra.scale
    )
    wider = pl.attribute(tiny_llama, samples, screen_cfg, cache, top_h=5)
    assert not wider.cached and int(wider.extra.exact.sum()) == 5
    # exact scores keep their old key: the exact entry is still found
    assert pl.attribute(tiny_llama, samples, exact_cfg, cache).cached
    assert torch.allclose(first.value[first.extra.exact], exact.value[first.extra.exact], rtol=1e-5)
    rec = pl.screen_record(first.extra, screen_cfg)
    assert sum(rec["exact"].values()) == 3 and len(rec["screening"]) == 8
    assert "not in the paper" in rec["mode"]


def test_cli_screen_mode_writes_which_scores_are_exact(tmp_path, cache_root):
    out = tmp_path / "a"
    args = ["attribute", "--model", "builtin:tiny-llama", "--ships-samples", "3"]
    args += ["--ships-mode", "screen", "--ships-candidates", "1", "--top-h", "2"]
    assert main([*args, "--out", str(out), "--cache-dir", str(cache_root), "--quiet"]) == 0
    heads = json.loads((out / "heads.jsonl").read_text())
    rec = json.loads((out / "screen.json").read_text())
    exact = [k for k, v in rec["exact"].items() if v]
    assert len(exact) == 2 and set(heads) == set(rec["exact"])
    assert min(heads[k] for k in exact) > max(heads[k] for k in heads if k not in exact)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["ships"]["mode"] == "screen"


def test_config_and_input_errors(tiny_llama):
    with pytest.raises(ConfigError, match="mode"):
        ShipsConfig(mode="fast")
    with pytest.raises(ConfigError, match="candidates"):
        ShipsConfig(candidates=0)
    with pytest.raises(ValueError, match="at least 2"):
        screen_scores(tiny_llama, probes(tiny_llama, 1), ShipsConfig(num_samples=1))
    with pytest.raises(ValueError, match="top_h"):
        screen_then_exact(tiny_llama, probes(tiny_llama, 2), ShipsConfig(num_samples=2), top_h=9)
