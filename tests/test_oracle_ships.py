"""Ships scores against a naive loop with its own ablation hook (issue 18).

``tests/test_core_ships.py`` compares ``ships_scores`` with a naive loop, but that loop ablates
through the library's own ``head_ablation`` hook and (for ``angle``) scores with the library's
``principal_angle_sum``, so a bug shared by both passes it. Here the reference is written from
the method alone:

- one full forward pass of the model per prompt and per head;
- the ablation is a forward pre-hook of this file on the layer's ``o_proj``: the head's input
  slice ``[h*d_h, (h+1)*d_h)`` is set to 0 (``zero``) or, for ``uniform``, replaced by the
  causal running mean (over positions ``0..t``) of its KV group's value vectors
  (``v_proj`` output, group ``h // (H/K)``), captured by a forward hook of this file;
- ``angle``: final-norm hidden states at the last position stacked over prompts; the largest
  principal angle (degrees) between the leading ``r`` left singular vectors, summed over
  ``r = 1..r_main``; ``kl``: ``KL(p || p_ablated)`` of the next-token distributions from the
  model's own logits, averaged over prompts.

The GQA tiny Llama is used, where two query heads share each KV head.
"""

from __future__ import annotations

import math

import pytest
import torch

from hsr_core.config import ShipsConfig
from hsr_core.data import Sample, builtin_calibration
from hsr_core.encoding import encode_one
from hsr_core.ships import ships_scores


def probe_samples(n: int) -> list[Sample]:
    return [Sample(s.prompt) for s in builtin_calibration().safety[:n]]


def naive_forward(loaded, inputs, head=None, mode="zero"):
    """``(final-norm state at the last position, next-token logits)``, float64, with ``head``
    ``(layer, h)`` ablated by this file's own hooks (or nothing ablated)."""
    a = loaded.adapter
    H, K = a.num_heads, a.num_kv_heads
    d = a.hidden_size // H
    handles = []
    if head is not None:
        layer, h = head
        attn = a.layers[layer].self_attn
        captured = {}

        def grab(_m, _inp, out):
            captured["v"] = out.detach()

        def ablate(_m, args):
            x = args[0].clone()
            if mode == "zero":
                x[..., h * d : (h + 1) * d] = 0
            else:
                g = h // (H // K)
                v = captured["v"][0, :, g * d : (g + 1) * d].double()  # [seq, d]
                for t in range(v.shape[0]):
                    x[0, t, h * d : (h + 1) * d] = v[: t + 1].mean(dim=0).to(x.dtype)
            return (x, *args[1:])

        handles.append(attn.v_proj.register_forward_hook(grab))
        handles.append(attn.o_proj.register_forward_pre_hook(ablate))
    try:
        with torch.no_grad():
            out = loaded.model(**inputs, output_hidden_states=True, use_cache=False)
    finally:
        for hd in handles:
            hd.remove()
    return out.hidden_states[-1][0, -1].double(), out.logits[0, -1].double()


def largest_angle_deg(U: torch.Tensor, V: torch.Tensor) -> float:
    """Largest principal angle between span(U) and span(V) (orthonormal columns), degrees."""
    cos = torch.linalg.svdvals(U.T @ V).min().item()
    return math.degrees(math.acos(min(1.0, max(-1.0, cos))))


def naive_ships(loaded, samples, mode: str, metric: str, r_main: int = 1) -> torch.Tensor:
    a = loaded.adapter
    L, H = a.num_layers, a.num_heads
    encoded = [encode_one(loaded, s, with_response=False)[0] for s in samples]
    intact = [naive_forward(loaded, x) for x in encoded]
    out = torch.zeros(L, H, dtype=torch.float64)
    for l in range(L):
        for h in range(H):
            ablated = [naive_forward(loaded, x, (l, h), mode) for x in encoded]
            if metric == "kl":
                total = 0.0
                for (_, p_logits), (_, q_logits) in zip(intact, ablated, strict=True):
                    logp = torch.log_softmax(p_logits, -1)
                    logq = torch.log_softmax(q_logits, -1)
                    total += float((logp.exp() * (logp - logq)).sum())
                out[l, h] = total / len(samples)
            else:
                M = torch.stack([s for s, _ in intact])  # [N, hidden]
                M_A = torch.stack([s for s, _ in ablated])
                U = torch.linalg.svd(M, full_matrices=False).U
                UA = torch.linalg.svd(M_A, full_matrices=False).U
                out[l, h] = sum(
                    largest_angle_deg(U[:, :r], UA[:, :r]) for r in range(1, r_main + 1)
                )
    return out


@pytest.mark.parametrize(
    ("mode", "metric", "r_main"),
    [
        ("uniform", "angle", 1),
        ("uniform", "kl", 1),
        ("zero", "kl", 1),
        ("zero", "angle", 2),
    ],
)
def test_ships_scores_equal_independent_naive_loop(tiny_llama, mode, metric, r_main):
    """Catches, for ``uniform``: the running mean taken over the whole sequence (not causal),
    over the wrong KV group (``h`` or ``h % K`` instead of ``h // (H/K)``), or of the queries /
    keys instead of the values; for ``zero``: the wrong slice zeroed (a KV group's, or an
    off-by-one block); for ``kl``: the KL direction reversed, not averaged over prompts, or
    taken at another position; for ``angle``: the wrong singular vectors (right instead of
    left), a missing absolute value, or the r_main sum dropped."""
    loaded = tiny_llama
    a = loaded.adapter
    assert a.num_kv_heads < a.num_heads  # GQA: the KV group mapping matters
    samples = probe_samples(3)
    cfg = ShipsConfig(num_samples=3, ablation=mode, metric=metric, r_main=r_main, batch_size=3)
    fast = ships_scores(loaded, samples, cfg).double()
    slow = naive_ships(loaded, samples, mode, metric, r_main)
    assert fast.shape == (a.num_layers, a.num_heads)
    assert torch.isfinite(fast).all() and (slow > 0).all()
    if metric == "kl":
        assert torch.allclose(fast, slow, rtol=1e-4, atol=1e-9)
    else:  # degrees; the two agree to about 1e-5 relative (float32 forward passes)
        assert torch.allclose(fast, slow, rtol=1e-4, atol=1e-4)
    # the heads really differ, so a score given to the wrong head shows
    assert slow.flatten().unique().numel() == slow.numel()
    assert (slow.flatten().sort().values.diff() > 1e-2 * slow.abs().max()).any()


def test_uniform_and_zero_differ_and_heads_of_one_group_differ(tiny_llama):
    """Catches ``uniform`` silently doing ``zero`` and ablating a whole KV group (both heads
    of a group must give different scores under either mode)."""
    loaded = tiny_llama
    samples = probe_samples(2)
    zero = ships_scores(loaded, samples, ShipsConfig(num_samples=2, metric="kl"))
    uniform = ships_scores(
        loaded, samples, ShipsConfig(num_samples=2, metric="kl", ablation="uniform")
    )
    assert not torch.allclose(zero, uniform, rtol=1e-2)
    for scores in (zero, uniform):
        for l in range(2):
            assert not math.isclose(scores[l, 0], scores[l, 1], rel_tol=1e-3)
            assert not math.isclose(scores[l, 2], scores[l, 3], rel_tol=1e-3)
