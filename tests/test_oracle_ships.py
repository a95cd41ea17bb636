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
from oracles import memory_llama

# imported at collection, so that mutmut's warm-up loads them once (not once per mutant)
from transformers import LlamaForCausalLM, MllamaForConditionalGeneration  # noqa: F401

from hsr_core import ships
from hsr_core.config import ShipsConfig
from hsr_core.data import Sample, builtin_calibration, with_typographic_images
from hsr_core.distributed import World
from hsr_core.encoding import encode_one
from hsr_core.heads import all_heads
from hsr_core.hooks import count_hooks, record_layers
from hsr_core.models import LoadedModel, load_model
from hsr_core.progress import Cancelled
from hsr_core.ships import ablated_finals, ships_scores


def probe_samples(n: int) -> list[Sample]:
    return [Sample(s.prompt) for s in builtin_calibration().safety[:n]]


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    """The built-in tiny Llama's shape (2 layers, 4 heads, 2 KV heads), built in memory (not
    saved or loaded: a fraction of a second, for the mutation runs); Ships never changes it."""
    return memory_llama()


@pytest.fixture(scope="module")
def mllama(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The built-in tiny Llama-3.2-Vision (4 decoder layers, layer 2 a cross-attention layer,
    which Mllama skips for a prompt without an image), saved and loaded once for this file."""
    from hsr_core.builtin import save_tiny_mllama

    root = tmp_path_factory.mktemp("ships-mllama")
    return load_model(str(save_tiny_mllama(root / "model")), cache_dir=root / "cache")


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
def test_ships_scores_equal_independent_naive_loop(llama, mode, metric, r_main):
    """Catches, for ``uniform``: the running mean taken over the whole sequence (not causal),
    over the wrong KV group (``h`` or ``h % K`` instead of ``h // (H/K)``), or of the queries /
    keys instead of the values; for ``zero``: the wrong slice zeroed (a KV group's, or an
    off-by-one block); for ``kl``: the KL direction reversed, not averaged over prompts, or
    taken at another position; for ``angle``: the wrong singular vectors (right instead of
    left), a missing absolute value, or the r_main sum dropped."""
    loaded = llama
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


def test_uniform_and_zero_differ_and_heads_of_one_group_differ(llama):
    """Catches ``uniform`` silently doing ``zero`` and ablating a whole KV group (both heads
    of a group must give different scores under either mode)."""
    loaded = llama
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


# ---------------------------------------------------------------------------------------------
# the batched replay, the driver, the halving on running out of memory and the multi-process
# path, on tiny models built once per file (fast: mutation runs)


def answered(n: int, skip: int = 0) -> list[Sample]:
    """Harmful requests with their refusals: Ships must read the prompt only."""
    return list(builtin_calibration().safety[skip : skip + n])


def naive_finals(loaded, sample, heads, mode: str) -> torch.Tensor:
    """``[heads, hidden]`` float64: one full pass per head, ablated by this file's hooks."""
    inputs, _, _ = encode_one(loaded, sample, with_response=False)
    return torch.stack([naive_forward(loaded, inputs, hd, mode)[0] for hd in heads])


def recorded(loaded, sample):
    inputs, _, _ = encode_one(loaded, sample, with_response=False)
    return record_layers(loaded.model, loaded.adapter, inputs)


@pytest.mark.parametrize("mode", ["zero", "uniform"])
def test_ablated_finals_equal_full_passes(llama, mode):
    """Every batch size (one head a batch, batches spanning both layers and growing during the
    replay, one batch, a batch larger than the heads): each row is the final-norm state of a
    full pass with that head ablated; the progress after each batch; no graph, no hooks left."""
    a = llama.adapter
    heads = all_heads(a.num_layers, a.num_heads)  # 8
    sample = answered(1)[0]
    record = recorded(llama, sample)
    slow = naive_finals(llama, sample, heads, mode)
    assert (slow - record.final[0, -1].double()).abs().amax(-1).min() > 1e-3  # all ablate
    for batch, fractions in [
        (1, [i / 8 for i in range(1, 9)]),
        (3, [3 / 8, 6 / 8, 1.0]),
        (8, [1.0]),
        (20, [1.0]),
    ]:
        seen = []
        fast = ablated_finals(
            llama, record, heads, mode=mode, batch_size=batch, on_batch=seen.append
        )
        assert fast.shape == (8, a.hidden_size) and fast.dtype == torch.float32
        assert not fast.requires_grad  # run under inference mode: no graph
        assert torch.allclose(fast.double(), slow, rtol=1e-4, atol=1e-5), batch
        assert seen == fractions
        assert count_hooks(llama.model) == 0
    # heads of the last layer only, and one head: the replay starts at that layer
    tail = [(1, 0), (1, 3)]
    got = ablated_finals(llama, record, tail, mode=mode, batch_size=1)
    assert torch.allclose(got.double(), slow[[4, 7]], rtol=1e-4, atol=1e-5)
    # the default mode is zero, the default batch 16 (24 rows: a head may come more than once)
    if mode == "zero":
        seen = []
        thrice = sorted(heads * 3)
        got = ablated_finals(llama, record, thrice, on_batch=seen.append)
        assert seen == [16 / 24, 1.0]
        assert torch.allclose(got.double(), slow.repeat_interleave(3, 0), rtol=1e-4, atol=1e-5)


def test_ablated_finals_stop_between_batches(llama):
    a = llama.adapter
    heads = all_heads(a.num_layers, a.num_heads)
    record = recorded(llama, answered(1)[0])
    asked, seen = [], []

    def stop() -> bool:
        asked.append(1)
        return len(asked) == 3

    with pytest.raises(Cancelled):
        ablated_finals(llama, record, heads, batch_size=2, should_stop=stop, on_batch=seen.append)
    assert len(asked) == 3 and seen == [2 / 8, 4 / 8]  # polled before each batch
    assert count_hooks(llama.model) == 0
    asked.clear()
    ablated_finals(llama, record, heads, batch_size=3, should_stop=lambda: bool(asked.append(1)))
    assert len(asked) == 3


def test_ablated_finals_of_a_skipped_cross_attention_layer(mllama):
    """A prompt without an image: Mllama skips its cross-attention layer 2, so ablating one of
    its heads changes nothing (the intact state, exactly); the other heads' replay passes over
    the skipped layer (the identity), as the full passes do. With an image, layer 2 runs and
    its heads change the state."""
    a = mllama.adapter
    assert a.cross_layers == {2}
    heads = all_heads(a.num_layers, a.num_heads)  # 16
    plain = answered(1)[0]
    record = recorded(mllama, plain)
    assert record.skipped == {2}
    intact = record.final[0, -1]
    others = [hd for hd in heads if hd[0] != 2]
    slow = naive_finals(mllama, plain, others, "zero")
    for batch, fractions in [
        (3, [3 / 16, 6 / 16, 9 / 16, 12 / 16]),
        (5, [5 / 16, 10 / 16, 12 / 16]),
    ]:
        seen = []
        fast = ablated_finals(mllama, record, heads, batch_size=batch, on_batch=seen.append)
        assert fast.shape == (16, a.hidden_size) and seen == fractions
        for i, (l, _) in enumerate(heads):
            if l == 2:
                assert torch.equal(fast[i], intact), i
        rest = fast[[i for i, hd in enumerate(heads) if hd[0] != 2]]
        assert torch.allclose(rest.double(), slow, rtol=1e-4, atol=1e-5), batch
    # only heads of the skipped layer: nothing to replay, the intact state for each
    cross = [(2, 0), (2, 3), (2, 1)]
    seen = []
    got = ablated_finals(mllama, record, cross, on_batch=seen.append)
    assert got.shape == (3, a.hidden_size) and seen == []
    assert all(torch.equal(row, intact) for row in got)
    # with an image the cross-attention heads count
    pictured = with_typographic_images([plain])[0]
    rec = recorded(mllama, pictured)
    assert rec.skipped == frozenset()
    got = ablated_finals(mllama, rec, cross)
    assert all((row - rec.final[0, -1]).abs().max() > 1e-4 for row in got)


class Steps:
    """``ships.steps`` replaced: records each bar's items, label and unit, and every
    ``advance(fraction)`` as ``(item index, fraction)``."""

    def __init__(self, monkeypatch):
        self.bars: list[tuple[list, str, str]] = []
        self.advanced: list[tuple[int, float]] = []

        def steps(items, *, desc, unit="it"):
            self.bars.append((list(items), desc, unit))
            for i, item in enumerate(items):
                yield item, (lambda f, i=i: self.advanced.append((i, f)))

        monkeypatch.setattr(ships, "steps", steps)


def composed(loaded, samples, cfg, heads=None) -> torch.Tensor:
    """``ships_scores`` put together by hand from its parts: each prompt (without its response)
    recorded and replayed in batches of ``cfg.batch_size``; ``angle``: the float32 states'
    principal angles; ``kl``: float64 KLs added prompt by prompt, divided by the count; the
    heads of a cross-attention layer no prompt ran score 0."""
    a = loaded.adapter
    heads = sorted(heads) if heads is not None else all_heads(a.num_layers, a.num_heads)
    intact, ablated = [], []
    kl = torch.zeros(len(heads), dtype=torch.float64)
    never = set(a.cross_layers)
    for s in samples:
        record = recorded(loaded, Sample(s.prompt, image=s.image, image_text=s.image_text))
        never &= record.skipped
        finals = ablated_finals(loaded, record, heads, mode=cfg.ablation, batch_size=cfg.batch_size)
        base = record.final[:, -1]
        intact.append(base.float())
        ablated.append(finals.float())
        with torch.inference_mode():
            kl += ships._kl(a.lm_head(base), a.lm_head(finals))
    if cfg.metric == "angle":
        values = ships.principal_angle_sum(torch.cat(intact), torch.stack(ablated, 1), cfg.r_main)
    else:
        values = kl / len(samples)
    table = torch.full((a.num_layers, a.num_heads), math.nan)
    for (l, h), v in zip(heads, values.tolist(), strict=True):
        table[l, h] = 0.0 if l in never else v
    return table


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same float32 table, NaN where the other has NaN, every other value bit for bit."""
    return (
        a.dtype == b.dtype == torch.float32
        and a.shape == b.shape
        and torch.equal(a.isnan(), b.isnan())
        and torch.equal(a.nan_to_num(), b.nan_to_num())
    )


@pytest.mark.parametrize(
    ("metric", "ablation", "r_main", "batch"),
    [
        ("kl", "zero", 1, 3),
        ("kl", "uniform", 1, 16),
        ("angle", "uniform", 2, 5),
        ("angle", "zero", 1, 3),
    ],
)
def test_ships_scores_compose_their_parts_exactly(
    llama, monkeypatch, metric, ablation, r_main, batch
):
    """The driver, bit for bit: prompts with answers (ignored), the configured mode, batch and
    r_main, the KLs summed in float64; its bar (label, unit, the prompts, the advance after
    every replay batch) and the stop flag polled once a prompt and once a replay batch."""
    samples = answered(3)
    cfg = ShipsConfig(
        num_samples=3, metric=metric, ablation=ablation, r_main=r_main, batch_size=batch
    )
    want = composed(llama, samples, cfg)
    bar = Steps(monkeypatch)
    asked = []
    got = ships_scores(llama, samples, cfg, should_stop=lambda: bool(asked.append(1)))
    assert same(got, want)
    assert not got.isnan().any()
    assert bar.bars == [(samples, "Ships attribution", "prompt")]
    per_prompt = [min(b, 8) / 8 for b in range(batch, 8 + batch, batch)]
    assert bar.advanced == [(i, f) for i in range(3) for f in per_prompt]
    assert len(asked) == 3 * (1 + len(per_prompt))
    assert count_hooks(llama.model) == 0


def test_ships_scores_of_some_heads(llama):
    """Heads given in any order: only those scored (as in the full table), the rest NaN."""
    samples = answered(2)
    cfg = ShipsConfig(num_samples=2, metric="kl", batch_size=2)
    some = [(1, 2), (0, 3), (1, 0)]
    got = ships_scores(llama, samples, cfg, heads=some)
    assert same(got, composed(llama, samples, cfg, heads=some))
    assert got.isnan().sum() == 5 and not got[1, 2].isnan() and not got[0, 3].isnan()
    full = ships_scores(llama, samples, cfg)
    for hd in some:
        assert got[hd].item() == pytest.approx(full[hd].item(), rel=1e-5)


def test_ships_scores_prompt_counts(llama):
    """``angle`` needs at least max(2, r_main) prompts; ``kl`` works with one."""
    for n, r_main in [(1, 1), (1, 2), (2, 3)]:
        with pytest.raises(ValueError) as e:
            ships_scores(llama, answered(n), ShipsConfig(num_samples=3, r_main=r_main))
        need = max(2, r_main)
        assert str(e.value) == (
            f"dataset-level Ships needs at least {need} probe prompts (got {n}): with one "
            "prompt every angle is 0"
        )
    for n, r_main in [(2, 1), (2, 2), (3, 3)]:
        cfg = ShipsConfig(num_samples=n, r_main=r_main, batch_size=8)
        assert same(ships_scores(llama, answered(n), cfg), composed(llama, answered(n), cfg))
    cfg = ShipsConfig(num_samples=1, metric="kl", r_main=3, batch_size=8)
    assert same(ships_scores(llama, answered(1), cfg), composed(llama, answered(1), cfg))


def test_ships_scores_stop(llama):
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) == 1

    with pytest.raises(Cancelled):  # before the first prompt is even encoded
        ships_scores(llama, answered(2), ShipsConfig(num_samples=2), should_stop=stop)
    assert len(asked) == 1 and count_hooks(llama.model) == 0


class Replays:
    """``ships.ablated_finals`` replaced: records each call's batch size and keywords, and runs
    out of memory for batches above ``fits`` (for every batch when ``fits`` is 0)."""

    def __init__(self, monkeypatch, fits: int):
        self.sizes: list[int] = []
        self.keywords: list[dict] = []
        real = ships.ablated_finals

        def replay(loaded, record, heads, **kw):
            self.sizes.append(kw["batch_size"])
            self.keywords.append(kw)
            if len(self.sizes) > 12:
                raise AssertionError("the batch never stops halving")
            if fits == 0 or kw["batch_size"] > fits:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(loaded, record, heads, **kw)

        monkeypatch.setattr(ships, "ablated_finals", replay)


@pytest.mark.parametrize(
    ("batch", "fits", "sizes"),
    [(8, 2, [8, 4, 2, 2, 2]), (6, 1, [6, 3, 1, 1, 1]), (3, 3, [3, 3, 3])],
)
def test_out_of_memory_halves_the_batch_and_keeps_it(llama, monkeypatch, batch, fits, sizes):
    """On running out of memory the replay is retried with half the batch (never below 1), and
    the batch that fitted is the next prompt's; the result is the same."""
    samples = answered(3)
    cfg = ShipsConfig(num_samples=3, metric="kl", ablation="uniform", batch_size=batch)
    want = ships_scores(llama, samples, cfg)
    calls = Replays(monkeypatch, fits)
    bar = Steps(monkeypatch)

    def stop() -> bool:
        return False

    got = ships_scores(llama, samples, cfg, should_stop=stop)
    assert calls.sizes == sizes
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-8)
    for kw in calls.keywords:
        assert kw["mode"] == "uniform" and kw["should_stop"] is stop and kw["on_batch"] is not None
    assert {i for i, _ in bar.advanced} == {0, 1, 2}  # each prompt's advance reached the replay


def test_out_of_memory_with_a_batch_of_one_is_raised(llama, monkeypatch):
    calls = Replays(monkeypatch, 0)
    with pytest.raises(torch.OutOfMemoryError):
        ships_scores(llama, answered(2), ShipsConfig(num_samples=2, batch_size=8))
    assert calls.sizes == [8, 4, 2, 1]


def test_vision_scores_compose_exactly_and_score_cross_heads(mllama):
    """A prompt with an image runs the cross-attention layer: its heads are scored; without any
    image they score exactly 0, with a warning."""
    pictured = with_typographic_images(answered(1))
    mixed = [pictured[0], *answered(1, skip=1)]  # the image first, the last prompt without
    for metric in ("kl", "angle"):
        cfg = ShipsConfig(num_samples=2, metric=metric, batch_size=5)
        got = ships_scores(mllama, mixed, cfg)
        assert same(got, composed(mllama, mixed, cfg))
        assert (got[2] != 0).all() and not got.isnan().any()
    cfg = ShipsConfig(num_samples=2, metric="kl", batch_size=5)
    with pytest.warns(UserWarning, match=r"cross-attention layers \[2\] never ran"):
        got = ships_scores(mllama, answered(2), cfg)
    assert (got[2] == 0).all() and (got[[0, 1, 3]] > 0).all()
    assert same(got, composed(mllama, answered(2), cfg))


# ---------------------------------------------------------------------------------------------
# the processes of accelerate launch, scripted in this process


class Scripted(World):
    """One process of a scripted ``size``-process world, run one after another in this process:
    ``gather`` on the main process needs every other's parts (sent by an earlier run), and a
    non-main process's ``broadcast`` number ``i`` needs the main one's (LookupError until
    then)."""

    def __init__(self, rank: int, size: int, board: dict):
        super().__init__(rank, size)
        self.board, self.calls = board, 0

    def gather(self, obj):
        self.board["sent"][self.rank] = obj
        if not self.is_main:
            return None
        if len(self.board["sent"]) < self.size:
            raise LookupError("the other processes have not sent yet")
        return [self.board["sent"][r] for r in range(self.size)]

    def broadcast(self, obj):
        i, self.calls = self.calls, self.calls + 1
        if self.is_main:
            self.board["answers"][i] = obj
            return obj
        if i not in self.board["answers"]:
            raise LookupError("the main process has not answered yet")
        return self.board["answers"][i]


def shared_run(loaded, samples, cfg, size, monkeypatch, **kw):
    """Every rank of a ``size``-process world: the main one (stopped at its gather), the others
    (stopped at the table's broadcast), the main one again, the others again. Returns each
    rank's table, and its bars and stop polls in its last run."""
    board: dict = {"sent": {}, "answers": {}}
    results, bars, polls = {}, {}, {}
    for rank in [0, *range(1, size), 0, *range(1, size)]:
        bar = Steps(monkeypatch)
        asked: list[int] = []
        w = Scripted(rank, size, board)
        monkeypatch.setattr(ships, "world", lambda w=w: w)
        try:
            results[rank] = ships_scores(
                loaded, samples, cfg, should_stop=lambda asked=asked: bool(asked.append(1)), **kw
            )
        except LookupError:
            continue
        finally:
            bars[rank], polls[rank] = (bar.bars, bar.advanced), len(asked)
    return results, bars, polls


@pytest.mark.parametrize(
    ("n", "size", "metric", "ablation", "batch"),
    [
        (5, 2, "angle", "zero", 3),  # by prompts: 3 | 2
        (3, 3, "kl", "uniform", 16),  # by prompts: one each
        (4, 3, "kl", "zero", 5),  # 2 | 1 | 1
        (1, 2, "kl", "zero", 3),  # by heads: batches 3, 3 | 2
        (2, 3, "angle", "uniform", 3),  # by heads: 3 | 3 | 2
        (1, 3, "kl", "uniform", 8),  # by heads: one batch, ranks 1 and 2 get none
    ],
)
def test_shared_scores_equal_one_process_bit_for_bit(
    llama, monkeypatch, n, size, metric, ablation, batch
):
    samples = answered(n)
    cfg = ShipsConfig(num_samples=n, metric=metric, ablation=ablation, batch_size=batch)
    one = ships_scores(llama, samples, cfg)
    results, bars, polls = shared_run(llama, samples, cfg, size, monkeypatch)
    assert sorted(results) == list(range(size))
    for rank, got in results.items():
        assert same(got, one), rank
    by_heads = n < size
    for rank in range(size):
        ((items, desc, unit),) = bars[rank][0]
        assert desc == f"Ships attribution ({rank + 1}/{size})" and unit == "prompt"
        if by_heads:  # every prompt, a share of the heads in whole batches
            assert items == list(range(n))
            span = ships.chunk_share(8, batch, rank, size)
            done = (
                [min(b, len(span)) / len(span) for b in range(batch, len(span) + batch, batch)]
                if len(span)
                else []
            )
        else:  # a share of the prompts, every head
            assert items == list(ships.share(n, rank, size))
            done = [min(b, 8) / 8 for b in range(batch, 8 + batch, batch)]
        assert bars[rank][1] == [(i, f) for i in range(len(items)) for f in done], rank
        assert polls[rank] == len(items) * (1 + len(done)), rank
    assert count_hooks(llama.model) == 0


def test_shared_scores_of_some_heads_use_the_main_processes_list(llama, monkeypatch):
    samples = answered(1)
    cfg = ShipsConfig(num_samples=1, metric="kl", batch_size=2)
    some = [(1, 3), (0, 0), (1, 1)]
    one = ships_scores(llama, samples, cfg, heads=some)
    results, _, _ = shared_run(llama, samples, cfg, 2, monkeypatch, heads=some)
    assert sorted(results) == [0, 1]
    assert all(same(got, one) for got in results.values())
    assert one.isnan().sum() == 5


@pytest.mark.parametrize(
    ("images", "size", "metric"),
    [
        ("1010", 2, "kl"),  # by prompts: the cross-attention layer ran in some prompts
        ("0110", 2, "angle"),
        ("01", 3, "angle"),  # by heads: layer 2 skipped in one prompt, its heads intact there
        ("10", 3, "kl"),
    ],
)
def test_vision_shared_scores_equal_one_process(mllama, monkeypatch, images, size, metric):
    plain = answered(len(images))
    pictured = with_typographic_images(plain)
    samples = [pictured[i] if c == "1" else plain[i] for i, c in enumerate(images)]
    cfg = ShipsConfig(num_samples=len(samples), metric=metric, batch_size=5)
    one = ships_scores(mllama, samples, cfg)
    assert same(one, composed(mllama, samples, cfg))
    assert (one[2] != 0).all()  # some prompt ran layer 2
    results, _, _ = shared_run(mllama, samples, cfg, size, monkeypatch)
    assert sorted(results) == list(range(size))
    for rank, got in results.items():
        assert same(got, one), rank


@pytest.mark.parametrize(("n", "size"), [(3, 2), (1, 2)])
def test_vision_shared_scores_without_images(mllama, monkeypatch, n, size):
    """No prompt has an image: layer 2's heads score 0 in every process (the main one warns)."""
    cfg = ShipsConfig(num_samples=n, metric="kl", batch_size=5)
    with pytest.warns(UserWarning, match=r"cross-attention layers \[2\] never ran"):
        one = ships_scores(mllama, answered(n), cfg)
    with pytest.warns(UserWarning, match=r"cross-attention layers \[2\] never ran"):
        results, _, _ = shared_run(mllama, answered(n), cfg, size, monkeypatch)
    assert sorted(results) == list(range(size))
    assert (one[2] == 0).all() and (one[[0, 1, 3]] > 0).all()
    for got in results.values():
        assert same(got, one)


class Moved:
    """An input tensor that records the device it is moved to (``.to``), then is the tensor."""

    def __init__(self, tensor: torch.Tensor, seen: list):
        self.tensor, self.seen = tensor, seen

    def to(self, device):
        self.seen.append(device)
        return self.tensor.to(device)


@pytest.mark.parametrize("size", [1, 2])
def test_inputs_go_to_the_models_device(llama, monkeypatch, size):
    """Each prompt's encoded inputs are moved to the model's device, one process or several
    (on a GPU a CPU input beside a CUDA model fails; on the CPU only the call shows it)."""
    seen: list = []
    real = ships.encode_one

    def encode(loaded, sample, **kw):
        inputs, p, r = real(loaded, sample, **kw)
        return {k: Moved(v, seen) for k, v in inputs.items()}, p, r

    monkeypatch.setattr(ships, "encode_one", encode)
    cfg = ShipsConfig(num_samples=2, metric="kl", batch_size=8)
    if size == 1:
        ships_scores(llama, answered(2), cfg)
        runs = 1
    else:
        results, _, _ = shared_run(llama, answered(2), cfg, size, monkeypatch)
        assert sorted(results) == [0, 1]
        runs = 2  # the main process and the other one, once each in full
    assert len(seen) >= 2 * runs * 2 and set(seen) == {llama.device}


def test_shared_angles_sum_over_r_main(llama, monkeypatch):
    """The main process sums the angles of the configured r_main directions (not the default 1)."""
    samples = answered(3)
    cfg = ShipsConfig(num_samples=3, metric="angle", r_main=2, batch_size=4)
    one = ships_scores(llama, samples, cfg)
    assert not same(one, ships_scores(llama, samples, ShipsConfig(num_samples=3, batch_size=4)))
    results, _, _ = shared_run(llama, samples, cfg, 2, monkeypatch)
    assert sorted(results) == [0, 1]
    assert all(same(got, one) for got in results.values())
