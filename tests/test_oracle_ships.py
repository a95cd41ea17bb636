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
import os
import sys

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


# ---------------------------------------------------------------------------------------------
# the scores' arithmetic and the heads file, without a model (fast: mutation runs)


def scipy_angle_sum(M, M_A, r_main: int) -> list[float]:
    """Per head: the sum over r of the largest principal angle (degrees) between the leading
    r left singular vectors of M and of M_A, by numpy's SVD and scipy's subspace angles."""
    import numpy as np
    from scipy.linalg import subspace_angles

    U = np.linalg.svd(M.double().numpy(), full_matrices=False)[0]
    out = []
    for m in M_A.double().numpy():
        V = np.linalg.svd(m, full_matrices=False)[0]
        out.append(
            sum(
                float(np.degrees(subspace_angles(U[:, :r], V[:, :r]).max()))
                for r in range(1, r_main + 1)
            )
        )
    return out


@pytest.mark.parametrize("r_main", [1, 2, 3])
def test_principal_angle_sum_equals_scipy(r_main):
    from hsr_core.ships import principal_angle_sum

    g = torch.Generator().manual_seed(r_main)
    M = torch.randn(6, 9, generator=g)
    M_A = torch.stack(
        [
            M + 0.05 * torch.randn(6, 9, generator=g),  # a small angle
            M + 2.0 * torch.randn(6, 9, generator=g),  # large ones
            torch.randn(6, 9, generator=g),
            M.clone(),  # no angle at all
        ]
    )
    got = principal_angle_sum(M, M_A, r_main)
    assert got.dtype == torch.float64 and got.shape == (4,)
    assert got.tolist() == pytest.approx(scipy_angle_sum(M, M_A, r_main), abs=1e-6)
    assert got[3].item() == pytest.approx(0.0, abs=1e-5)
    assert (got[:3] > 0).all()


def test_principal_angle_sum_beyond_the_rank():
    """More directions asked than the states span (6 prompts in 3 dimensions, r up to 5): the
    leading subspace stops at the rank, it is not filled with arbitrary directions."""
    from hsr_core.ships import principal_angle_sum

    g = torch.Generator().manual_seed(7)
    M = torch.randn(6, 3, generator=g, dtype=torch.float64)
    M_A = torch.stack([M + 0.3 * torch.randn(6, 3, generator=g, dtype=torch.float64)])
    got = principal_angle_sum(M, M_A, 5)
    assert got.tolist() == pytest.approx(scipy_angle_sum(M, M_A, 5), abs=1e-9)
    three = principal_angle_sum(M, M_A, 3).item() - principal_angle_sum(M, M_A, 2).item()
    assert got.item() == pytest.approx(principal_angle_sum(M, M_A, 3).item() + 2 * three)


def test_principal_angle_sum_by_hand():
    """Two prompts in a plane: the leading direction turned by 30 degrees (sign flips of the
    singular vectors change nothing), and a right angle."""
    from hsr_core.ships import principal_angle_sum

    M = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # u1 = e1
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    turned = torch.tensor([[3 * c, -s], [3 * s, c]], dtype=torch.float64)
    right = torch.tensor([[0.0, 1.0], [3.0, 0.0]], dtype=torch.float64)  # u1 = e2
    flipped = -M
    got = principal_angle_sum(M, torch.stack([turned, right, flipped]), 1)
    assert got.tolist() == pytest.approx([30.0, 90.0, 0.0], abs=1e-9)
    assert principal_angle_sum(M, torch.stack([turned]), 2).tolist() == pytest.approx([30.0])
    assert principal_angle_sum(M, torch.stack([turned])).tolist() == pytest.approx([30.0])
    # three prompts: the first direction kept, the second turned by 30 degrees
    M3 = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    second = torch.tensor([[3.0, 0, 0], [0, 2 * c, -s], [0, 2 * s, c]], dtype=torch.float64)
    assert principal_angle_sum(M3, second[None]).tolist() == pytest.approx([0.0], abs=1e-9)
    assert principal_angle_sum(M3, second[None], 2).tolist() == pytest.approx([30.0])


def test_kl_by_hand():
    from hsr_core.ships import _kl

    p = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]], dtype=torch.float64)  # (1/4, 3/4)
    q = torch.tensor([[0.0, 0.0], [5.0, 5.0]])  # (1/2, 1/2); equal to p's second row
    got = _kl(p, q)
    want = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert got.dtype == torch.float64 and got.shape == (2,)
    assert got[0].item() == pytest.approx(want, rel=1e-12)
    assert got[1].item() == pytest.approx(0.0, abs=1e-15)
    back = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # the other direction
    assert _kl(q, p)[0].item() == pytest.approx(back, rel=1e-12)
    big = torch.tensor([[100.0, 0.0]])  # float32 softmax would round p to (1, 0)
    assert _kl(big, torch.zeros(1, 2))[0].item() == pytest.approx(
        math.log(2.0) - math.log1p(math.exp(-100.0)) - 100 * math.exp(-100) / (1 + math.exp(-100)),
        rel=1e-9,
    )


def test_heads_file_written_and_read_by_hand(tmp_path):
    import json

    from hsr_core.ships import read_heads_jsonl, write_heads_jsonl

    scores = torch.tensor([[0.5, 1.25, -2.0], [3.0, 0.0, 7.5]])
    path = write_heads_jsonl(scores, str(tmp_path / "heads.jsonl"))
    assert path == tmp_path / "heads.jsonl"
    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n") and text.count("\n") == 1
    assert json.loads(text) == {
        "0-0": 0.5,
        "0-1": 1.25,
        "0-2": -2.0,
        "1-0": 3.0,
        "1-1": 0.0,
        "1-2": 7.5,
    }
    assert list(json.loads(text)) == ["0-0", "0-1", "0-2", "1-0", "1-1", "1-2"]
    assert torch.equal(read_heads_jsonl(str(path), 2, 3), scores)
    # the last non-blank line wins; a head missing from it is NaN
    path.write_text('{"0-0": 9}\n{"1-2": 4.5, "0-1": 2}\n\n  \n', encoding="utf-8")
    back = read_heads_jsonl(path, 2, 3)
    assert back[1, 2].item() == 4.5 and back[0, 1].item() == 2.0
    assert back.isnan().sum() == 4 and back.dtype == torch.float32


def test_heads_file_errors(tmp_path):
    from hsr_core.ships import read_heads_jsonl

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError) as e:
        read_heads_jsonl(empty, 2, 2)
    assert str(e.value) == f"{empty}: empty heads file"
    bad = tmp_path / "bad.jsonl"
    for key, why in [("2-0", "2-0"), ("x", "is not a head")]:
        bad.write_text(json_line({key: 1.0}), encoding="utf-8")
        with pytest.raises(ValueError) as e:
            read_heads_jsonl(bad, 2, 2)
        msg = str(e.value)
        assert msg.startswith(f"{bad}: ") and why in msg and e.value.__cause__ is None
        assert e.value.__suppress_context__


def json_line(row) -> str:
    import json

    return json.dumps(row) + "\n"


def _table_via(*args):
    """One frame between the test and ``_score_table``, as ``ships_scores`` is for a caller."""
    from hsr_core.ships import _score_table

    return _score_table(*args)


def test_score_table_by_hand():
    import warnings

    heads = [(0, 1), (1, 2), (1, 0)]
    values = torch.tensor([0.5, 2.25, -1.0], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning without a layer that never ran
        table = _table_via(2, 3, heads, values, set())
        assert _table_via(2, 3, heads[:1], values[:1], {1}).isnan().sum() == 5
    assert table.dtype == torch.float32 and table.shape == (2, 3)
    assert table[0, 1].item() == 0.5 and table[1, 2].item() == 2.25 and table[1, 0].item() == -1
    assert table.isnan().sum() == 3
    with pytest.warns(UserWarning) as caught:
        line = sys._getframe().f_lineno + 1
        zeroed = _table_via(2, 3, heads, values, {1, 3})
    assert zeroed[1, 2].item() == 0.0 and zeroed[1, 0].item() == 0.0 and zeroed[0, 1].item() == 0.5
    assert len(caught) == 1
    assert str(caught[0].message) == (
        "no probe prompt has an image, so the cross-attention layers [1, 3] never ran "
        "(Mllama skips them without one): their heads score 0, which says nothing about "
        "them; give the probes images"
    )
    if "MUTANT_UNDER_TEST" not in os.environ:  # mutmut's trampoline adds a frame
        assert caught[0].filename == __file__ and caught[0].lineno == line  # the caller's line
    with pytest.raises(ValueError):
        _table_via(2, 3, heads, values[:2], set())
