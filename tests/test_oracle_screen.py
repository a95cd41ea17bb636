"""Ships screening (``hsr_core.screen``) against references written out here (issue 18).

Every reference is this file's own: each head's ablation direction built slice by slice from
values this file's hooks captured (``-z``, or the running mean of its KV group's values as a
loop over positions, or the mean over the vision tokens the cross-attention mask lets each
query see); the first-order effects as autograd of ``c . f`` with respect to one scalar per
head that moves that head's slice along its direction; the angle's perturbation formula and
the Fisher matrix's eigenpairs in float64 with numpy; screening as a slow loop over prompts and
heads; the merged ranking by hand. A tiny Llama built in memory (float64; 2 layers, 4 heads,
2 KV heads) and the tiny Llama-3.2-Vision (cross-attention at layer 2) are the models.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from oracles import memory_llama
from torch import nn

# imported at the top: collecting the file loads the model code once for a mutation run
from transformers import LlamaForCausalLM, MllamaForConditionalGeneration  # noqa: F401

from hsr_core import screen as sc
from hsr_core.config import ShipsConfig
from hsr_core.data import Sample, builtin_calibration, with_typographic_images
from hsr_core.encoding import encode_one, iter_batches
from hsr_core.hooks import HookSet, count_hooks
from hsr_core.models import LoadedModel, load_model
from hsr_core.progress import Cancelled
from hsr_core.screen import (
    ScreenResult,
    angle_estimate,
    cross_layers,
    directional_effects,
    fisher_directions,
    intact_final,
    merge_ranking,
    screen_scores,
    screen_then_exact,
    tracked_pass,
)


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    loaded = memory_llama()
    loaded.model.double()  # float64: the references here are exact to rounding
    return loaded


@pytest.fixture(scope="module")
def mllama(cache_root) -> LoadedModel:
    loaded = load_model("builtin:tiny-mllama", cache_dir=cache_root)
    loaded.model.double()
    return loaded


def prompts(n: int, images: bool = False) -> list[Sample]:
    samples = [Sample(s.prompt) for s in builtin_calibration().safety[:n]]
    return with_typographic_images(samples) if images else samples


def encoded(loaded, sample: Sample) -> dict[str, torch.Tensor]:
    return encode_one(loaded, sample, with_response=False)[0]


# ---------------------------------------------------------------------------------------------
# references


def by_hand_pass(loaded, inputs, mode: str):
    """One intact forward pass: the final-norm state at the last position (float64), each
    layer's ``o_proj`` input ``[seq, H, d_h]`` and each head's ablated slice minus it (None for
    a layer that did not run), all built here head by head."""
    a = loaded.adapter
    L, H, d_h, K = a.num_layers, a.num_heads, a.head_dim, a.num_kv_heads
    group = H // K
    seen: dict = {}

    def grab_v(layer):
        def fn(_m, _i, v):
            seen[layer, "v"] = v.detach().double()

        return fn

    def grab_mask(layer):
        def fn(_m, _args, kw):
            seen[layer, "mask"] = kw.get("attention_mask")

        return fn

    def grab_z(layer):
        def fn(_m, args):
            seen[layer, "z"] = args[0].detach().double()

        return fn

    def grab_final(_m, _i, out):
        seen["final"] = out.detach()[0, -1].double()

    with HookSet() as hooks, torch.no_grad():
        for layer in range(L):
            attn = a.attention(layer)
            hooks.post(attn.v_proj, grab_v(layer))
            hooks.pre(attn, grab_mask(layer), with_kwargs=True)
            hooks.pre(attn.o_proj, grab_z(layer))
        hooks.post(a.final_norm, grab_final)
        loaded.model(**inputs, use_cache=False)
    zs: list = [None] * L
    deltas: list = [None] * L
    for layer in range(L):
        if (layer, "z") not in seen:
            continue
        x = seen[layer, "z"][0]  # [seq, H * d_h]
        seq = x.shape[0]
        z = torch.stack([x[:, h * d_h : (h + 1) * d_h] for h in range(H)], 1)  # [seq, H, d_h]
        d = torch.zeros_like(z)
        for h in range(H):
            kv = h // group
            if mode == "zero":
                target = torch.zeros(seq, d_h, dtype=torch.float64)
            elif a.layer_kind(layer) == "cross":
                v = seen[layer, "v"].reshape(-1, K, d_h)[:, kv]  # [vision, d_h]
                mask = seen[layer, "mask"]
                rows = []
                for t in range(seq):
                    if mask is None:
                        ok = torch.ones(v.shape[0], dtype=torch.bool)
                    else:
                        m = mask[0, 0, t]
                        ok = m if m.dtype == torch.bool else m == 0
                    rows.append(v[ok].mean(0) if ok.any() else torch.zeros(d_h, dtype=v.dtype))
                target = torch.stack(rows)
            else:
                v = seen[layer, "v"][0, :, kv * d_h : (kv + 1) * d_h]  # [seq, d_h]
                target = torch.stack([v[: t + 1].mean(0) for t in range(seq)])
            d[:, h] = target - z[:, h]
        zs[layer], deltas[layer] = z, d
    return seen["final"], zs, deltas


def by_hand_effects(loaded, inputs, C: torch.Tensor, mode: str) -> torch.Tensor:
    """``[k, L, H]``: d(c . f)/d eps of ``z_h + eps delta_h`` at eps = 0, one scalar per head
    (autograd through a second forward pass with the directions from ``by_hand_pass``)."""
    a = loaded.adapter
    L, H, d_h = a.num_layers, a.num_heads, a.head_dim
    _, _, deltas = by_hand_pass(loaded, inputs, mode)
    eps = torch.zeros(L, H, dtype=torch.float64, requires_grad=True)
    seen: dict = {}

    def move(layer):
        def fn(_m, args):
            x = args[0]
            d = deltas[layer]  # [seq, H, d_h]
            parts = [
                x[..., h * d_h : (h + 1) * d_h] + (eps[layer, h] * d[:, h]).to(x.dtype)[None]
                for h in range(H)
            ]
            return (torch.cat(parts, dim=-1), *args[1:])

        return fn

    def grab_final(_m, _i, out):
        seen["final"] = out[0, -1].double()

    with HookSet() as hooks, torch.enable_grad():
        for layer in range(L):
            if deltas[layer] is not None:
                hooks.pre(a.attention(layer).o_proj, move(layer))
        hooks.post(a.final_norm, grab_final)
        loaded.model(**inputs, use_cache=False)
        f = seen["final"]
        rows = [torch.autograd.grad(f @ c.double(), eps, retain_graph=True)[0] for c in C]
    return torch.stack(rows)


def angle_by_hand(M: torch.Tensor, T: torch.Tensor, r_main: int) -> np.ndarray:
    """The docstring's formula with loops over every entry of every block (numpy, float64)."""
    M = M.double().numpy()
    T = T.double().numpy()
    N = M.shape[0]
    U, S, _ = np.linalg.svd(M, full_matrices=True)
    s = np.zeros(N)
    s[: len(S)] = S
    out = np.zeros(T.shape[2])
    for h in range(T.shape[2]):
        for r in range(1, r_main + 1):
            C = np.zeros((N - r, r))
            for k in range(r, N):
                for j in range(r):
                    C[k - r, j] = s[j] * (U[:, k] @ T[j, :, h]) / (s[j] ** 2 - s[k] ** 2)
            out[h] += math.degrees(math.atan(np.linalg.norm(C, 2)))
    return out


def fisher_by_hand(W, b, f, top_tokens: int, directions: int):
    """Eigenpairs of ``sum_t p_t (W_t - p^T W)(W_t - p^T W)^T`` over the likeliest tokens."""
    W = W.detach().double().numpy()
    logits = W @ f.double().numpy() + (0 if b is None else b.detach().double().numpy())
    p = np.exp(logits - logits.max())
    p /= p.sum()
    mean_row = p @ W
    top = np.argsort(-p, kind="stable")[: min(top_tokens, len(p))]
    A = np.zeros((W.shape[1], W.shape[1]))
    for t in top:
        A += p[t] * np.outer(W[t] - mean_row, W[t] - mean_row)
    lam, q = np.linalg.eigh(A)
    lam, q = lam[::-1], q[:, ::-1].T
    n = min(directions, len(top), W.shape[1])
    return lam[:n], q[:n]


def final_of(loaded, inputs) -> torch.Tensor:
    return by_hand_pass(loaded, inputs, "zero")[0]


# ---------------------------------------------------------------------------------------------
# cross_layers


def test_cross_layers(llama, mllama):
    assert cross_layers(llama.adapter) == set()
    assert cross_layers(mllama.adapter) == {2}
    assert mllama.model.config.text_config.cross_attention_layers == [2]
    fake = SimpleNamespace(layer_kinds=lambda: ["self", "cross", "self", "cross", "self"])
    assert cross_layers(fake) == {1, 3}


# ---------------------------------------------------------------------------------------------
# tracked_pass and intact_final


@pytest.mark.parametrize("mode", ["zero", "uniform"])
def test_tracked_pass_against_a_plain_pass(llama, mode):
    a = llama.adapter
    inputs = encoded(llama, prompts(1)[0])
    seq = inputs["input_ids"].shape[1]
    before = count_hooks(llama.model)
    final, zs, deltas = by_hand_pass(llama, inputs, mode)
    with torch.no_grad():  # the pass turns gradients on itself
        tracked = tracked_pass(llama, inputs, mode)
    assert count_hooks(llama.model) == before
    assert tracked.final.shape == (a.hidden_size,) and tracked.final.requires_grad
    assert torch.allclose(tracked.final.double(), final, rtol=0, atol=1e-12)
    assert len(tracked.leaves) == len(tracked.deltas) == a.num_layers
    for layer in range(a.num_layers):
        leaf, d = tracked.leaves[layer], tracked.deltas[layer]
        assert leaf.shape == (1, seq, a.num_heads * a.head_dim) and leaf.requires_grad
        assert leaf.is_leaf and not leaf.any()
        assert d.dtype == torch.float32 and d.shape == (seq, a.num_heads, a.head_dim)
        assert not d.requires_grad
        assert torch.allclose(d.double(), deltas[layer], rtol=1e-6, atol=1e-6)
        if mode == "uniform":  # not just -z
            assert not torch.allclose(d.double(), -zs[layer], atol=1e-3)


def test_intact_final_against_a_plain_pass(llama, mllama):
    for loaded, sample in [(llama, prompts(3)[2]), (mllama, prompts(1, images=True)[0])]:
        inputs = encoded(loaded, sample)
        before = count_hooks(loaded.model)
        got = intact_final(loaded, inputs)
        assert count_hooks(loaded.model) == before
        assert not got.requires_grad and got.shape == (loaded.adapter.hidden_size,)
        assert torch.allclose(got.double(), final_of(loaded, inputs), rtol=0, atol=1e-12)
        # the last position, not another
        with torch.no_grad():
            out = loaded.model(**inputs, output_hidden_states=True, use_cache=False)
        assert torch.allclose(got, out.hidden_states[-1][0, -1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["zero", "uniform"])
def test_tracked_pass_of_a_cross_attention_layer(mllama, mode):
    a = mllama.adapter
    inputs = encoded(mllama, prompts(1, images=True)[0])
    final, _, deltas = by_hand_pass(mllama, inputs, mode)
    tracked = tracked_pass(mllama, inputs, mode)
    assert torch.allclose(tracked.final.double(), final, rtol=0, atol=1e-12)
    for layer in range(a.num_layers):
        assert tracked.leaves[layer] is not None
        assert torch.allclose(tracked.deltas[layer].double(), deltas[layer], atol=1e-6)
    if mode == "uniform":  # the mask lets some queries see fewer vision tokens than all
        seen = {}
        with HookSet() as hooks, torch.no_grad():
            hooks.pre(a.attention(2), lambda m, args, kw: seen.update(kw), with_kwargs=True)
            mllama.model(**inputs, use_cache=False)
        mask = seen["attention_mask"]
        allowed = mask == 0 if mask.dtype != torch.bool else mask
        assert not allowed.all()


def test_tracked_pass_without_an_image_skips_the_cross_layer(mllama):
    a = mllama.adapter
    inputs = encoded(mllama, prompts(1)[0])
    tracked = tracked_pass(mllama, inputs, "uniform")
    assert tracked.leaves[2] is None and tracked.deltas[2] is None
    assert all(tracked.leaves[i] is not None for i in (0, 1, 3))
    C = torch.randn(2, a.hidden_size, dtype=torch.float64)
    got = directional_effects(tracked, C)
    assert (got[:, 2] == 0).all() and (got[:, [0, 1, 3]] != 0).all()
    want = by_hand_effects(mllama, inputs, C, "uniform")
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7 * float(want.abs().max()))


class _Adapter:
    """The model's adapter with some attributes replaced."""

    def __init__(self, adapter, **replaced):
        self._adapter, self._replaced = adapter, replaced

    def __getattr__(self, name):
        if name in self._replaced:
            return self._replaced[name]
        return getattr(self._adapter, name)


def test_tracked_pass_errors(llama):
    a = llama.adapter
    inputs = encoded(llama, prompts(1)[0])
    with pytest.raises(ValueError, match=r"^unknown ablation mode 'mean'$"):
        tracked_pass(llama, inputs, "mean")
    (batch,) = iter_batches(llama, prompts(2), 2, with_response=False)
    with pytest.raises(
        RuntimeError, match=r"^screening runs one prompt at a time, got a batch of 2$"
    ):
        tracked_pass(llama, batch.inputs, "zero")
    msg = r"^the tracked forward pass did not run every decoder layer$"
    # a layer whose attention never runs (not a cross-attention layer)
    unused = nn.Module()
    unused.v_proj, unused.o_proj = nn.Linear(2, 2), nn.Linear(2, 2)
    attention = _Adapter(a, attention=lambda i: unused if i == 1 else a.attention(i))
    with pytest.raises(RuntimeError, match=msg):
        tracked_pass(dataclasses.replace(llama, adapter=attention), inputs, "zero")
    # a final norm that never runs
    no_norm = _Adapter(a, final_norm=nn.Identity())
    with pytest.raises(RuntimeError, match=msg):
        tracked_pass(dataclasses.replace(llama, adapter=no_norm), inputs, "uniform")
    assert count_hooks(llama.model) == 0


# ---------------------------------------------------------------------------------------------
# directional_effects


@pytest.mark.parametrize("mode", ["zero", "uniform"])
def test_directional_effects_against_autograd_by_head(llama, mode):
    a = llama.adapter
    torch.manual_seed(3)
    for sample in prompts(2):
        inputs = encoded(llama, sample)
        C = torch.randn(3, a.hidden_size, dtype=torch.float64)
        got = directional_effects(tracked_pass(llama, inputs, mode), C)
        assert got.dtype == torch.float64 and got.shape == (3, a.num_layers, a.num_heads)
        want = by_hand_effects(llama, inputs, C, mode)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7 * float(want.abs().max()))
        assert (want != 0).all()
        # one direction, given in float32
        one = directional_effects(tracked_pass(llama, inputs, mode), C[1:2].float())
        assert torch.allclose(one[0], by_hand_effects(llama, inputs, C[1:2].float(), mode)[0])


@pytest.mark.parametrize("mode", ["zero", "uniform"])
def test_directional_effects_of_a_cross_attention_layer(mllama, mode):
    a = mllama.adapter
    inputs = encoded(mllama, prompts(1, images=True)[0])
    torch.manual_seed(4)
    C = torch.randn(2, a.hidden_size, dtype=torch.float64)
    got = directional_effects(tracked_pass(mllama, inputs, mode), C)
    want = by_hand_effects(mllama, inputs, C, mode)
    assert (want[:, 2] != 0).all()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7 * float(want.abs().max()))


# ---------------------------------------------------------------------------------------------
# angle_estimate and fisher_directions


@pytest.mark.parametrize(
    ("N", "d", "r_main"), [(5, 8, 1), (5, 8, 2), (6, 3, 1), (6, 3, 3), (4, 4, 2)]
)
def test_angle_estimate_against_the_formula(N, d, r_main):
    g = torch.Generator().manual_seed(N * 100 + d * 10 + r_main)
    M = torch.randn(N, d, generator=g, dtype=torch.float64) * torch.linspace(3, 1, d)
    T = torch.randn(r_main, N, 7, generator=g, dtype=torch.float64)
    got = angle_estimate(M, T, r_main)
    assert got.dtype == torch.float64 and got.shape == (7,)
    want = angle_by_hand(M, T, r_main)
    assert np.allclose(got.numpy(), want, rtol=1e-10, atol=0), (got, want)
    # float32 inputs are taken to float64 first
    got32 = angle_estimate(M.float(), T.float(), r_main)
    assert np.allclose(got32.numpy(), angle_by_hand(M.float(), T.float(), r_main), rtol=1e-10)


def test_angle_estimate_defaults_to_one_direction():
    g = torch.Generator().manual_seed(9)
    M = torch.randn(5, 6, generator=g, dtype=torch.float64)
    T = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    assert np.allclose(angle_estimate(M, T[:1]).numpy(), angle_by_hand(M, T, 1), rtol=1e-10)
    assert not np.allclose(angle_by_hand(M, T, 1), angle_by_hand(M, T, 2))


def _head(vocab: int, hidden: int, dtype, bias: bool = True, seed: int = 0, spread: float = 1.0):
    torch.manual_seed(seed)
    head = nn.Linear(hidden, vocab, bias=bias, dtype=dtype)
    with torch.no_grad():
        head.weight.mul_(spread)
    return SimpleNamespace(adapter=SimpleNamespace(lm_head=head)), head


@pytest.mark.parametrize(
    ("vocab", "hidden", "top", "k"), [(11, 5, 11, 5), (11, 5, 4, 3), (9, 6, 20, 9), (7, 4, 7, 2)]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fisher_directions_against_the_matrix(vocab, hidden, top, k, dtype):
    loaded, head = _head(vocab, hidden, dtype, spread=3.0)
    f = torch.randn(hidden, dtype=dtype)
    lam, q = fisher_directions(loaded, f, top_tokens=top, directions=k)
    lam_w, q_w = fisher_by_hand(head.weight, head.bias, f, top, k)
    n = min(k, top, hidden)
    assert lam.dtype == q.dtype == torch.float64 and lam.shape == (n,) and q.shape == (n, hidden)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert np.allclose(lam.numpy(), lam_w, rtol=tol, atol=tol * lam_w.max())
    for i in range(n):  # each eigenvector up to its sign
        sign = np.sign(q[i].numpy() @ q_w[i])
        assert np.allclose(q[i].numpy() * sign, q_w[i], atol=100 * tol)


def test_fisher_directions_defaults():
    """256 tokens kept, one direction; every token has some probability here."""
    loaded, head = _head(300, 4, torch.float64, spread=0.5, seed=1)
    f = torch.randn(4, dtype=torch.float64)
    lam, q = fisher_directions(loaded, f)
    lam_w, q_w = fisher_by_hand(head.weight, head.bias, f, 256, 1)
    assert lam.shape == (1,) and q.shape == (1, 4)
    assert np.allclose(lam.numpy(), lam_w, rtol=1e-10)
    lam_all, _ = fisher_by_hand(head.weight, head.bias, f, 300, 1)
    lam_257, _ = fisher_by_hand(head.weight, head.bias, f, 257, 1)
    assert not np.allclose(lam_w, lam_all, rtol=1e-6) and not np.allclose(lam_w, lam_257, rtol=1e-8)
    # the whole vocabulary's mean row, not the kept tokens' one
    lam_f, _ = fisher_directions(loaded, f, top_tokens=2, directions=4)
    lam_f_w, _ = fisher_by_hand(head.weight, head.bias, f, 2, 4)
    assert lam_f.shape == (2,) and np.allclose(lam_f.numpy(), lam_f_w, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# screen_scores


def slow_screen(loaded, samples, cfg, kl_directions=1, top_tokens=256) -> torch.Tensor:
    """Screening written as a loop: per prompt its intact state, per head its first-order
    effect along each direction from ``by_hand_effects``, then the formulas above."""
    a = loaded.adapter
    L, H = a.num_layers, a.num_heads
    inputs = [encoded(loaded, s) for s in samples]
    if cfg.metric == "angle":
        M = torch.stack([final_of(loaded, x) for x in inputs])
        V = torch.from_numpy(np.linalg.svd(M.numpy())[2][: cfg.r_main].copy())
        T = torch.stack([by_hand_effects(loaded, x, V, cfg.ablation) for x in inputs], 1)
        return torch.from_numpy(angle_by_hand(M, T.view(cfg.r_main, len(inputs), -1), cfg.r_main))
    total = torch.zeros(L, H, dtype=torch.float64)
    W, b = a.lm_head.weight, a.lm_head.bias
    for x in inputs:
        lam, q = fisher_by_hand(W, b, final_of(loaded, x), top_tokens, kl_directions)
        t = by_hand_effects(loaded, x, torch.from_numpy(q.copy()), cfg.ablation)  # [k, L, H]
        for j in range(len(lam)):
            total += 0.5 * float(lam[j]) * t[j] ** 2
    return (total / len(inputs)).flatten()


@pytest.mark.parametrize(
    ("metric", "mode", "r_main"),
    [("angle", "zero", 1), ("angle", "uniform", 2), ("kl", "zero", 1), ("kl", "uniform", 1)],
)
def test_screen_scores_against_a_slow_loop(llama, metric, mode, r_main):
    a = llama.adapter
    samples = prompts(3)
    cfg = ShipsConfig(num_samples=3, metric=metric, ablation=mode, r_main=r_main)
    kw = {} if mode == "zero" else {"kl_directions": 3, "top_tokens": 40}
    got = screen_scores(llama, samples, cfg, **kw)
    assert got.dtype == torch.float32 and got.shape == (a.num_layers, a.num_heads)
    want = slow_screen(llama, samples, cfg, **kw).float().view(a.num_layers, a.num_heads)
    assert (want > 0).all()
    assert torch.allclose(got, want, rtol=1e-4, atol=0), (got, want)


def test_screen_scores_kl_of_one_prompt(llama):
    cfg = ShipsConfig(num_samples=1, metric="kl")
    got = screen_scores(llama, prompts(1), cfg)
    want = slow_screen(llama, prompts(1), cfg).float().view(got.shape)
    assert torch.allclose(got, want, rtol=1e-4, atol=0)


def test_screen_scores_polls_and_reports_progress(llama, monkeypatch):
    calls = []

    def fake_bar(iterable, **kw):
        calls.append(kw)
        return iterable

    monkeypatch.setattr(sc, "bar", fake_bar)
    polls = []
    flag = lambda: polls.append(1) and False  # noqa: E731
    samples = prompts(3)
    screen_scores(llama, samples, ShipsConfig(num_samples=3), should_stop=flag)
    assert len(polls) == 6
    assert calls == [
        {"desc": "Ships screening: intact", "unit": "prompt"},
        {"desc": "Ships screening", "unit": "prompt"},
    ]
    calls.clear()
    polls.clear()
    screen_scores(llama, samples, ShipsConfig(num_samples=3, metric="kl"), should_stop=flag)
    assert len(polls) == 3 and calls == [{"desc": "Ships screening", "unit": "prompt"}]
    # a stop in the second loop (after the intact states) and in the kl loop
    for metric, after in [("angle", 4), ("kl", 2)]:
        n = []
        stop = lambda n=n, after=after: n.append(1) or len(n) > after  # noqa: E731
        with pytest.raises(Cancelled):
            screen_scores(
                llama, samples, ShipsConfig(num_samples=3, metric=metric), should_stop=stop
            )
        assert len(n) == after + 1


def test_screen_scores_moves_the_inputs_to_the_models_device(llama, monkeypatch):
    seen = []

    class Stop(Exception):
        pass

    def record(_loaded, inputs, *args):
        seen.extend(v.device.type for v in inputs.values())
        raise Stop

    monkeypatch.setattr(sc, "intact_final", record)
    monkeypatch.setattr(sc, "tracked_pass", record)
    monkeypatch.setattr(type(llama), "device", property(lambda self: torch.device("meta")))
    for metric in ("angle", "kl"):
        with pytest.raises(Stop):
            screen_scores(llama, prompts(2), ShipsConfig(num_samples=2, metric=metric))
    assert seen and set(seen) == {"meta"}


def test_screen_scores_errors(llama, monkeypatch):
    msg = "^dataset-level Ships needs at least {} probe prompts \\(got {}\\): with one prompt every angle is 0$"
    with pytest.raises(ValueError, match=msg.format(2, 1)):
        screen_scores(llama, prompts(1), ShipsConfig(num_samples=1))
    with pytest.raises(ValueError, match=msg.format(3, 2)):
        screen_scores(llama, prompts(2), ShipsConfig(num_samples=3, r_main=3))
    bad = torch.ones(8, dtype=torch.float64)
    bad[5] = math.inf
    monkeypatch.setattr(sc, "angle_estimate", lambda *args: bad)
    with pytest.raises(
        RuntimeError,
        match=r"^screening produced non-finite scores \(degenerate singular values\?\)$",
    ):
        screen_scores(llama, prompts(2), ShipsConfig(num_samples=2))
    monkeypatch.setattr(sc, "angle_estimate", lambda *args: torch.ones(8, dtype=torch.float64))
    assert torch.equal(
        screen_scores(llama, prompts(2), ShipsConfig(num_samples=2)), torch.ones(2, 4)
    )


# ---------------------------------------------------------------------------------------------
# merge_ranking and screen_then_exact


def f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def below(x: float) -> float:
    """The float32 just below ``x``."""
    return float(torch.nextafter(torch.tensor(x, dtype=torch.float32), torch.tensor(-math.inf)))


NAN = math.nan


@pytest.mark.parametrize(
    ("screening", "exact", "scores", "scale"),
    [
        # others above the lowest exact score: scaled by 0.5 / 4, the top one just below it
        (
            [[4.0, 1.0], [2.0, 3.0]],
            [[NAN, NAN], [0.5, 1.0]],
            [[below(0.5), 0.125], [0.5, 1.0]],
            0.125,
        ),
        # the lowest exact score negative: shifted down by 4 - (-1)
        (
            [[4.0, 1.0], [2.0, 3.0]],
            [[NAN, NAN], [-1.0, 2.0]],
            [[below(-1.0), -4.0], [-1.0, 2.0]],
            1.0,
        ),
        # the lowest exact score 0: shifted (a scale of 0 would tie them all)
        ([[4.0, 1.0], [2.0, 3.0]], [[NAN, NAN], [0.0, 2.0]], [[below(0.0), -3.0], [0.0, 2.0]], 1.0),
        # already below: as they are
        ([[4.0, 1.0], [2.0, 3.0]], [[NAN, NAN], [5.0, 6.0]], [[4.0, 1.0], [5.0, 6.0]], 1.0),
        # a tie with the lowest exact score: just below it, scale 1
        ([[2.0, 1.0], [2.0, 3.0]], [[NAN, NAN], [2.0, 6.0]], [[below(2.0), 1.0], [2.0, 6.0]], 1.0),
        # below in float64, equal once rounded to float32: moved just below
        (
            [[1 - 1e-12, 0.5], [7.0, 3.0]],
            [[NAN, NAN], [1.0, 9.0]],
            [[below(1.0), 0.5], [1.0, 9.0]],
            1.0,
        ),
        # one exact head, others tied: the ties kept
        (
            [[3.0, 3.0], [2.0, 0.5]],
            [[NAN, NAN], [1.5, NAN]],
            [[below(1.5), below(1.5)], [1.5, 0.25]],
            0.5,
        ),
        # every head exact: the exact scores
        ([[4.0, 1.0], [2.0, 3.0]], [[0.1, 0.2], [0.3, -0.4]], [[0.1, 0.2], [0.3, -0.4]], 1.0),
    ],
)
def test_merge_ranking_by_hand(screening, exact, scores, scale):
    s = torch.tensor(screening, dtype=torch.float64)
    e = torch.tensor(exact, dtype=torch.float64)
    res = merge_ranking(s, e)
    assert isinstance(res, ScreenResult)
    assert res.scores.dtype == torch.float32 and res.screening.dtype == torch.float32
    assert res.scores.tolist() == [[f32(x) for x in row] for row in scores]
    assert res.exact.dtype == torch.bool and torch.equal(res.exact, ~torch.isnan(e))
    assert torch.equal(res.screening, s.float())
    assert res.scale == scale and isinstance(res.scale, float)


def test_merge_ranking_errors():
    with pytest.raises(ValueError, match=r"^no head has an exact score$"):
        merge_ranking(torch.ones(2, 2), torch.full((2, 2), math.nan))


@pytest.mark.parametrize(("top_h", "c", "n"), [(2, 2, 4), (1, 3, 3), (3, 3, 8), (8, 1, 8)])
def test_screen_then_exact_scripted(llama, monkeypatch, top_h, c, n):
    screening = torch.tensor([[0.3, 0.9, 0.1, 0.5], [0.7, 0.2, 0.8, 0.4]])
    calls = []
    flag = lambda: False  # noqa: E731
    samples = prompts(2)
    cfg = ShipsConfig(num_samples=2, candidates=c)

    def fake_screen(loaded, p, config, **kw):
        calls.append(("screen", loaded, p, config, kw))
        return screening

    def fake_ships(loaded, p, config, **kw):
        calls.append(("ships", loaded, p, config, kw))
        out = torch.full((2, 4), math.nan)
        for layer, h in kw["heads"]:
            out[layer, h] = 10.0 + layer * 4 + h
        return out

    monkeypatch.setattr(sc, "screen_scores", fake_screen)
    monkeypatch.setattr(sc, "ships_scores", fake_ships)
    res = screen_then_exact(llama, samples, cfg, top_h=top_h, should_stop=flag)
    order = [(0, 1), (1, 2), (1, 0), (0, 3), (1, 3), (0, 0), (1, 1), (0, 2)]  # by screening
    assert calls[0] == ("screen", llama, samples, cfg, {"should_stop": flag})
    assert calls[1] == ("ships", llama, samples, cfg, {"heads": order[:n], "should_stop": flag})
    assert all(type(h) is tuple for h in calls[1][4]["heads"]) and len(calls) == 2
    exact = torch.full((2, 4), math.nan)
    for layer, h in order[:n]:
        exact[layer, h] = 10.0 + layer * 4 + h
    want = merge_ranking(screening, exact)
    assert torch.equal(res.scores, want.scores) and torch.equal(res.exact, want.exact)
    assert int(res.exact.sum()) == n and res.scale == want.scale


def test_screen_then_exact_errors(llama):
    for top_h in (0, 9, -1):
        with pytest.raises(ValueError, match=rf"^top_h must be in 1\.\.8, got {top_h}$"):
            screen_then_exact(llama, prompts(2), ShipsConfig(num_samples=2), top_h=top_h)


def test_screen_then_exact_on_the_model(llama):
    """The real screen and exact Ships: the re-scored heads are the screen's best."""
    from hsr_core.heads import top_heads
    from hsr_core.ships import ships_scores

    samples = prompts(3)
    cfg = ShipsConfig(num_samples=3, candidates=1, batch_size=4)
    res = screen_then_exact(llama, samples, cfg, top_h=3)
    screening = screen_scores(llama, samples, cfg)
    picked = top_heads(screening, 3)
    assert torch.equal(res.screening, screening)
    assert {tuple(h) for h in top_heads(res.exact.float(), 3)} == {tuple(h) for h in picked}
    exact = ships_scores(llama, samples, cfg, heads=[tuple(h) for h in picked])
    assert torch.equal(res.scores, merge_ranking(screening, exact).scores)


def test_directional_effects_move_the_directions_to_the_passs_device():
    """On the ``meta`` device (no data, but every operation checks devices) the CPU
    directions are moved to the pass's device: the gradients are taken and only the copy of
    the result to the CPU fails, not the product ``f . c`` (a CPU ``c`` there raises a
    device mismatch first)."""
    leaf = torch.zeros(1, 3, 8, device="meta", requires_grad=True)
    final = (leaf[0] @ torch.ones(8, 5, device="meta")).sum(0)  # [hidden = 5]
    delta = torch.ones(3, 2, 4, device="meta")
    tracked = sc.TrackedPass(final, [leaf, None], [delta, None])
    with pytest.raises(NotImplementedError, match="meta"):
        directional_effects(tracked, torch.ones(2, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="device"):  # what the move prevents
        final @ torch.ones(5)


def test_directional_effects_of_a_pass_written_by_hand():
    """``f = sum_s A[s]^T x_s`` of one layer's input (a model with a single decoder layer):
    d(c . f)/dx_s = A[s] c, so head h's effect is ``sum_s (A[s] c)_h . delta[s, h]``."""
    g = torch.Generator().manual_seed(5)
    seq, H, d_h, hidden = 3, 2, 4, 5
    A = torch.randn(seq, H * d_h, hidden, generator=g, dtype=torch.float64)
    leaf = torch.zeros(1, seq, H * d_h, dtype=torch.float64, requires_grad=True)
    final = torch.einsum("sx,sxo->o", leaf[0] + 1.0, A)
    delta = torch.randn(seq, H, d_h, generator=g)
    C = torch.randn(3, hidden, generator=g, dtype=torch.float64)
    got = directional_effects(sc.TrackedPass(final, [leaf], [delta]), C)
    want = torch.zeros(3, 1, H, dtype=torch.float64)
    for j in range(3):
        grad = A @ C[j]  # [seq, H * d_h]
        for h in range(H):
            for s in range(seq):
                want[j, 0, h] += grad[s, h * d_h : (h + 1) * d_h] @ delta[s, h].double()
    assert torch.allclose(got, want, rtol=1e-6, atol=0)


def test_tracked_pass_of_a_cross_attention_layer_without_its_mask(mllama):
    """Inputs without the cross-attention mask: every query sees every vision token."""
    inputs = dict(encoded(mllama, prompts(1, images=True)[0]))
    del inputs["cross_attention_mask"]
    final, _, deltas = by_hand_pass(mllama, inputs, "uniform")
    tracked = tracked_pass(mllama, inputs, "uniform")
    assert torch.allclose(tracked.final.double(), final, rtol=0, atol=1e-12)
    assert torch.allclose(tracked.deltas[2].double(), deltas[2], atol=1e-6)


def test_screen_scores_ignore_the_responses(llama):
    """Probe prompts with answers are scored as their prompts alone (the last prompt token)."""
    plain = prompts(2)
    answered = [Sample(s.prompt, response="I cannot help with that.") for s in plain]
    for metric in ("angle", "kl"):
        cfg = ShipsConfig(num_samples=2, metric=metric)
        assert torch.equal(screen_scores(llama, answered, cfg), screen_scores(llama, plain, cfg))


def test_screen_scores_sum_the_kl_terms_in_float64(llama, monkeypatch):
    """Per-prompt terms of 1 and 5e-8 (scripted): summed in float32 the small ones vanish."""
    L, H = llama.adapter.num_layers, llama.adapter.num_heads
    terms = iter([1.0, 5e-8, 5e-8])

    def effects(_tracked, q):
        t = torch.full((1, L, H), math.sqrt(2 * next(terms)), dtype=torch.float64)
        return t

    monkeypatch.setattr(sc, "tracked_pass", lambda *args: SimpleNamespace(final=None))
    monkeypatch.setattr(
        sc, "fisher_directions", lambda *a, **k: (torch.ones(1, dtype=torch.float64), None)
    )
    monkeypatch.setattr(sc, "directional_effects", effects)
    got = screen_scores(llama, prompts(3), ShipsConfig(num_samples=3, metric="kl"))
    want = torch.tensor((1.0 + 5e-8 + 5e-8) / 3, dtype=torch.float64).float()
    assert want != torch.tensor(1.0 / 3)
    assert torch.equal(got, torch.full((L, H), float(want)))
