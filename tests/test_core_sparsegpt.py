"""SparseGPT against a slow, obvious optimal-brain-surgeon loop, against Wanda and magnitude on
layer reconstruction, on the tiny models (sequential order, weights untouched, stop), and
against llmcompressor's SparseGPT where that is installed."""

from __future__ import annotations

import pytest
import torch

from hsr_core import sparsegpt as sg
from hsr_core.config import WandaConfig
from hsr_core.data import Sample, builtin_calibration, with_typographic_images
from hsr_core.encoding import encode_one
from hsr_core.hooks import HookSet, count_hooks
from hsr_core.masks import sparsity_report
from hsr_core.progress import Cancelled
from hsr_core.sparsegpt import (
    HessianError,
    hessians,
    sparsegpt_count,
    sparsegpt_linear,
    sparsegpt_masks,
)
from hsr_core.wanda import mask_from_scores, wanda_score

# ---------------------------------------------------------------------------------------------
# the slow, obvious reference


def oracle_obs(W, H, *, sparsity, n=0, m=0, blocksize, percdamp=0.01):
    """SparseGPT the slow way, in float64: one column at a time, one pruned weight at a time.

    The inverse Hessian is inverted once and then, after each column, that input is eliminated
    from it explicitly (``Hinv -= Hinv[:, i] Hinv[i, :] / Hinv[i, i]``): no Cholesky. Each
    pruned weight ``w = W[r, i]`` is removed with the optimal brain surgeon update of the
    inputs not yet fixed, ``W[r, i:] -= w / Hinv[i, i] * Hinv[i, i:]``. The score of a weight
    is ``W[r, j]^2 / Hinv^(j)[j, j]`` with ``Hinv^(j)`` the inverse Hessian when column ``j`` is
    reached; the mask rule is the reference's: unstructured, at each block start the ``k =
    int(rows * block * sparsity)`` lowest scores of the block over all rows (ties: row-major
    order); N:M, at each group start, the N lowest of each row from the current values.
    """
    W = W.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    for j in range(cols):
        if H[j, j] == 0:
            H[j, j] = 1
            W[:, j] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=torch.float64)
    cur = torch.linalg.inv(H)
    seq = []  # seq[i]: the inverse Hessian with inputs 0..i-1 eliminated
    for i in range(cols):
        seq.append(cur.clone())
        cur = cur - torch.outer(cur[:, i], cur[i, :]) / cur[i, i]
    saliency_den = [seq[j][j, j].item() for j in range(cols)]
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(cols):
        if n == 0 and i % blocksize == 0:
            block = range(i, min(i + blocksize, cols))
            entries = [
                (W[r, j].item() ** 2 / saliency_den[j], r, j) for r in range(rows) for j in block
            ]
            entries.sort(key=lambda e: e[0])  # stable: ties keep row-major order
            for _, r, j in entries[: int(len(entries) * sparsity)]:
                mask[r, j] = True
        if n > 0 and (i % blocksize) % m == 0:
            for r in range(rows):
                group = [(W[r, j].item() ** 2 / saliency_den[j], j) for j in range(i, i + m)]
                group.sort(key=lambda e: e[0])
                for _, j in group[:n]:
                    mask[r, j] = True
        for r in range(rows):
            if mask[r, i]:
                e = W[r, i] / seq[i][i, i]
                W[r, i:] -= e * seq[i][i, i:]
                W[r, i] = 0
    return W, mask


def random_layer(out_f, in_f, tokens=400, seed=0, dead=()):
    """A weight and the Hessian ``2/N X^T X`` of correlated inputs with uneven feature scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5
    scale = torch.rand(in_f, generator=g) * 3 + 0.1
    X = (
        torch.randn(tokens, in_f, generator=g) @ mix + 0.5 * torch.randn(tokens, in_f, generator=g)
    ) * scale
    for j in dead:
        X[:, j] = 0
    W = torch.randn(out_f, in_f, generator=g)
    H = 2 / tokens * X.T @ X
    return W, X, (H + H.T) / 2  # exactly symmetric: Cholesky reads one triangle, inv both


CASES = [  # out, in, blocksize, sparsity, n, m, dead inputs
    (8, 32, 8, 0.5, 0, 0, ()),
    (12, 40, 16, 0.6, 0, 0, (5,)),  # a short last block, a dead input
    (6, 24, 32, 0.3, 0, 0, ()),  # one block wider than the layer
    (8, 32, 8, 0.0, 2, 4, ()),
    (10, 48, 16, 0.0, 2, 4, (0, 17)),
    (7, 24, 12, 0.0, 1, 4, ()),
]


@pytest.mark.parametrize(("out_f", "in_f", "bs", "s", "n", "m", "dead"), CASES)
def test_equals_one_column_at_a_time_obs(out_f, in_f, bs, s, n, m, dead):
    W, _, H = random_layer(out_f, in_f, seed=out_f + in_f, dead=dead)
    slow_w, slow_mask = oracle_obs(W, H, sparsity=s, n=n, m=m, blocksize=bs)
    # float64 in, float64 math: equal to rounding
    w64, mask64 = sparsegpt_linear(W.double(), H.double(), sparsity=s, n=n, m=m, blocksize=bs)
    assert w64.dtype == torch.float64 and torch.equal(mask64, slow_mask)
    assert torch.allclose(w64, slow_w, rtol=0, atol=1e-9)
    # float32 (the real case): the same mask, weights within float32 rounding
    w32, mask32 = sparsegpt_linear(W, H, sparsity=s, n=n, m=m, blocksize=bs)
    assert w32.dtype == torch.float32 and torch.equal(mask32, slow_mask)
    assert torch.allclose(w32.double(), slow_w, rtol=1e-4, atol=1e-4 * W.abs().max().item())
    # pruned entries exactly 0; kept entries changed (the update); counts exact
    assert bool((w32[mask32] == 0).all()) and not torch.equal(w32[~mask32], W[~mask32])
    assert int(mask32.sum()) == sparsegpt_count(W.shape, sparsity=s, n=n, m=m, blocksize=bs)
    for j in dead:
        assert bool((w32[:, j] == 0).all())
    if n:
        assert bool((mask32.view(out_f, -1, m).sum(-1) == n).all())
    else:
        for i1 in range(0, in_f, bs):  # the mask is per block, over all rows
            block = mask32[:, i1 : i1 + bs]
            assert int(block.sum()) == int(block.numel() * s)


def test_half_precision_weight_and_inputs_left_alone():
    W, _, H = random_layer(8, 32, seed=3)
    Wb, Hc = W.bfloat16(), H.clone()
    before = Wb.clone()
    w, mask = sparsegpt_linear(Wb, H, sparsity=0.5, blocksize=16)
    assert w.dtype == torch.bfloat16 and bool((w[mask] == 0).all())
    assert torch.equal(Wb, before) and torch.equal(H, Hc)
    w32, mask32 = sparsegpt_linear(Wb.float(), H, sparsity=0.5, blocksize=16)
    assert torch.equal(mask, mask32) and torch.equal(w, w32.bfloat16())


def test_a_parameter_gives_a_plain_tensor_and_keeps_its_values():
    """Model weights are parameters (``requires_grad``): the result records no graph and the
    parameter is left as it was."""
    W, _, H = random_layer(8, 32, seed=4)
    param = torch.nn.Parameter(W.clone())
    w, mask = sparsegpt_linear(param, H, sparsity=0.5, blocksize=16)
    assert not w.requires_grad and w.grad_fn is None and not mask.requires_grad
    assert torch.equal(param.detach(), W)
    expected, expected_mask = sparsegpt_linear(W, H, sparsity=0.5, blocksize=16)
    assert torch.equal(w, expected) and torch.equal(mask, expected_mask)


def test_bad_inputs_are_clear_errors():
    W, _, H = random_layer(4, 8, seed=1)
    with pytest.raises(HessianError, match="not positive definite.*calibration samples.*percdamp"):
        sparsegpt_linear(W, -H, sparsity=0.5)
    with pytest.raises(ValueError, match="does not fit"):
        sparsegpt_linear(W, H[:4, :4], sparsity=0.5)
    with pytest.raises(ValueError, match="divisible by M"):
        sparsegpt_linear(W[:, :6], H[:6, :6], sparsity=0, n=2, m=4)
    with pytest.raises(ValueError, match="blocksize"):
        sparsegpt_linear(W, H, sparsity=0, n=2, m=4, blocksize=6)
    with pytest.raises(ValueError, match="fraction"):
        sparsegpt_linear(W, H, sparsity=1.0)
    bad = H.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="not finite"):
        sparsegpt_linear(W, bad, sparsity=0.5)
    assert not bool(sparsegpt_linear(W, H, sparsity=0.0)[1].any())  # sparsity 0 prunes nothing


# ---------------------------------------------------------------------------------------------
# reconstruction against Wanda and magnitude


@pytest.mark.parametrize("structure", ["unstructured", "n:m"])
def test_reconstruction_error_below_wanda_and_magnitude(structure):
    W, X, H = random_layer(32, 64, tokens=512, seed=7)
    cfg = WandaConfig(sparsity=0.5, structure=structure, n=2, m=4)
    n, m = (2, 4) if structure == "n:m" else (0, 0)
    w_sgpt, _ = sparsegpt_linear(W, H, sparsity=0.5, n=n, m=m, blocksize=16)
    norms = torch.linalg.vector_norm(X, dim=0)

    def err(w):
        return torch.linalg.matrix_norm(X @ W.T - X @ w.T).item()

    wanda = W.masked_fill(mask_from_scores(wanda_score(W, norms), cfg), 0)
    magnitude = W.masked_fill(mask_from_scores(wanda_score(W, torch.ones(64)), cfg), 0)
    e_s, e_w, e_m = err(w_sgpt), err(wanda), err(magnitude)
    assert int((w_sgpt == 0).sum()) == int((wanda == 0).sum()) == 32 * 32
    assert e_s < e_w and e_s < e_m, (e_s, e_w, e_m)


# ---------------------------------------------------------------------------------------------
# the model, layer by layer


def calibration(loaded, k=4):
    data = builtin_calibration().utility[:k]
    return with_typographic_images(data) if loaded.is_vision else data


def dense_weights(loaded):
    return {n: m.weight.detach().clone() for n, _, _, m in loaded.adapter.iter_linears()}


def empty_out(loaded):
    return {n: torch.full_like(m.weight, 7.0) for n, _, _, m in loaded.adapter.iter_linears()}


def hand_hessian(loaded, data, names):
    """``2/N X^T X`` of each linear's input over the response tokens, one sample at a time."""
    xs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    mods = {n: m for n, _, _, m in loaded.adapter.iter_linears()}
    for s in data:
        inputs, plen, rlen = encode_one(loaded, s)
        with HookSet() as hooks, torch.no_grad():
            for n in names:
                hooks.pre(
                    mods[n],
                    lambda _m, args, n=n, lo=plen, hi=plen + rlen: xs[n].append(
                        args[0][0, lo:hi].double().clone()
                    ),
                )
            loaded.model(**inputs)
    out = {}
    for n in names:
        X = torch.cat(xs[n])
        out[n] = (2 / X.shape[0] * X.T @ X).float()
    return out


@pytest.mark.parametrize("structure", ["unstructured", "n:m"])
def test_masks_on_every_tiny_model(any_tiny, structure):
    loaded = any_tiny
    cfg = WandaConfig(sparsity=0.5, structure=structure, n=2, m=4, batch_size=2)
    dense = dense_weights(loaded)
    out = empty_out(loaded)
    masks = sparsegpt_masks(loaded, calibration(loaded), cfg, out=out, blocksize=16)
    assert count_hooks(loaded.model) == 0
    assert masks.keys() == dense.keys() and len(masks) == 7 * loaded.adapter.num_layers
    for name, mod in ((n, m) for n, _, _, m in loaded.adapter.iter_linears()):
        assert torch.equal(mod.weight, dense[name]), f"{name} changed"
        mask = masks[name].unpack()
        assert torch.equal(out[name] == 0, mask), name  # zeros exactly where the mask says
        assert not torch.equal(out[name][~mask], dense[name][~mask])  # kept weights updated
        assert masks[name].count == int(mask.sum())
        if structure == "n:m":
            assert bool((mask.view(mask.shape[0], -1, 4).sum(-1) == 2).all()), name
        else:
            for i1 in range(0, mask.shape[1], 16):
                assert int(mask[:, i1 : i1 + 16].sum()) == mask.shape[0] * 8, name
    report = sparsity_report(loaded, masks)
    assert all(v == 0.5 for v in report["per_layer"].values())


def test_sequential_layers_equal_sparsegpt_linear_on_hand_hessians(tiny_mha):
    """Layer 0 from Hessians of the dense model; layer 1 from those of the model whose layer 0
    holds SparseGPT's pruned, updated weights (the reference's order)."""
    loaded = tiny_mha
    a = loaded.adapter
    data = calibration(loaded, 5)
    cfg = WandaConfig(sparsity=0.5, batch_size=2)
    out = empty_out(loaded)
    masks = sparsegpt_masks(loaded, data, cfg, out=out, blocksize=32)
    mods = {n: m for n, _, _, m in a.iter_linears()}
    layer0 = [a.linear_name(0, p) for p in ("q_proj", "o_proj", "up_proj", "down_proj")]
    layer1 = [a.linear_name(1, p) for p in ("k_proj", "o_proj", "gate_proj", "down_proj")]
    hs0 = hand_hessian(loaded, data, layer0)
    one_pass = hessians(loaded, data, cfg, names=layer0)
    dense = dense_weights(loaded)
    with torch.no_grad():
        for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            mods[a.linear_name(0, p)].weight.copy_(out[a.linear_name(0, p)])
    try:
        hs1 = hand_hessian(loaded, data, layer1)
    finally:
        with torch.no_grad():
            for n, m in mods.items():
                m.weight.copy_(dense[n])
    for name in layer0:
        assert torch.allclose(one_pass[name], hs0[name], rtol=1e-4, atol=1e-5), name
    for name, hs in [*((n, hs0) for n in layer0), *((n, hs1) for n in layer1)]:
        w, mask = sparsegpt_linear(mods[name].weight, hs[name], sparsity=0.5, blocksize=32)
        assert torch.equal(masks[name].unpack(), mask), name
        assert torch.allclose(out[name], w, rtol=1e-4, atol=1e-5), name
    dense_h1 = hand_hessian(loaded, data, layer1)  # with a dense layer 0: another Hessian
    assert not torch.allclose(dense_h1[layer1[0]], hs1[layer1[0]], rtol=1e-3, atol=1e-4)


def test_hessians_of_linears_reading_one_input_are_one_tensor(tiny_llama):
    a = tiny_llama.adapter
    names = [a.linear_name(0, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    hs = hessians(tiny_llama, calibration(tiny_llama, 3), WandaConfig(batch_size=2), names=names)
    assert hs[names[0]] is hs[names[1]] is hs[names[2]]
    assert hs[names[3]] is not hs[names[0]] and hs[names[3]].dtype == torch.float32


def test_cross_attention_keys_and_values_read_the_seen_vision_tiles(tiny_mllama):
    """Llama-3.2-Vision: a cross-attention layer's k/v Hessians sum the vision tokens of the
    tiles some text token attends to (padding tiles left out), one sample at a time by hand."""
    loaded = tiny_mllama
    a = loaded.adapter
    (layer,) = a.cross_layers
    k_name, q_name = a.linear_name(layer, "k_proj"), a.linear_name(layer, "q_proj")
    data = calibration(loaded, 3)
    xs = []
    for s in data:
        inputs, _, _ = encode_one(loaded, s)
        seen = inputs["cross_attention_mask"][0].bool().any(dim=0).reshape(-1)  # [images*tiles]
        assert not bool(seen.all())  # the tiny model's images have a padding tile
        with HookSet() as hooks, torch.no_grad():
            hooks.pre(
                a.linear(layer, "k_proj"),
                lambda _m, args, seen=seen: xs.append(
                    args[0].reshape(seen.numel(), -1, args[0].shape[-1])[seen].flatten(0, 1)
                ),
            )
            loaded.model(**inputs)
    X = torch.cat(xs).double()
    hand = (2 / X.shape[0] * X.T @ X).float()
    hs = hessians(loaded, data, WandaConfig(batch_size=2), names=[q_name, k_name])
    assert torch.allclose(hs[k_name], hand, rtol=1e-4, atol=1e-5)
    assert hs[q_name].shape == hand.shape and not torch.allclose(hs[q_name], hand)
    with pytest.raises(ValueError, match="cross-attention layers .* image"):
        sparsegpt_masks(
            loaded, builtin_calibration().utility[:2], WandaConfig(), out=empty_out(loaded)
        )


def test_stop_and_errors_leave_the_dense_weights(tiny_llama, monkeypatch):
    loaded = tiny_llama
    data = calibration(loaded, 4)
    cfg = WandaConfig(sparsity=0.5, batch_size=2)
    dense = dense_weights(loaded)

    def unchanged():
        assert count_hooks(loaded.model) == 0
        return all(torch.equal(m.weight, dense[n]) for n, _, _, m in loaded.adapter.iter_linears())

    polls = []
    with pytest.raises(Cancelled):  # stops during layer 1, after layer 0 was pruned
        sparsegpt_masks(
            loaded,
            data,
            cfg,
            out=empty_out(loaded),
            should_stop=lambda: polls.append(1) or len(polls) > 12,
        )
    assert unchanged()

    calls = []
    real = sg.run_layer

    def failing(layer, hidden, kwargs):  # the first pass with layer 0 pruned (2 batches)
        calls.append(1)
        if len(calls) == 3:
            assert not torch.equal(
                loaded.adapter.layers[0].self_attn.q_proj.weight,
                dense[loaded.adapter.linear_name(0, "q_proj")],
            )
            raise RuntimeError("boom")
        return real(layer, hidden, kwargs)

    monkeypatch.setattr(sg, "run_layer", failing)
    with pytest.raises(RuntimeError, match="boom"):
        sparsegpt_masks(loaded, data, cfg, out=empty_out(loaded))
    assert unchanged() and len(calls) == 3


def test_model_level_errors_name_the_linear(tiny_llama):
    loaded = tiny_llama
    a = loaded.adapter
    cfg = WandaConfig(sparsity=0.5, batch_size=2)
    out = empty_out(loaded)
    with pytest.raises(ValueError, match="no output tensor for"):
        sparsegpt_masks(loaded, calibration(loaded, 2), cfg, out={})
    bad = {**out, a.linear_name(0, "q_proj"): out[a.linear_name(0, "q_proj")].double()}
    with pytest.raises(ValueError, match="q_proj.*float64"):
        sparsegpt_masks(loaded, calibration(loaded, 2), cfg, out=bad)
    # one sample with a short answer: the Hessian has rank < in_features; undamped, it is singular
    first = builtin_calibration().utility[0]
    short = [Sample(first.prompt, response="Yes.")]
    with pytest.raises(HessianError, match=r"SparseGPT on .*layers\.0\..*not positive definite"):
        sparsegpt_masks(loaded, short, cfg, out=out, percdamp=0.0)
    no_answers = [Sample(first.prompt)]
    with pytest.raises(ValueError, match="no calibration tokens"):
        sparsegpt_masks(loaded, no_answers, cfg, out=out)


# ---------------------------------------------------------------------------------------------
# llmcompressor's SparseGPT (optional)


@pytest.mark.parametrize("structure", ["unstructured", "n:m"])
def test_equals_llmcompressor_sparsegpt(structure):
    sgpt = pytest.importorskip("llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify")
    out_f, in_f, bs = 24, 64, 16
    W, _, H = random_layer(out_f, in_f, seed=11)
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)

    def theirs(sparsity, n, m):
        _, w = sgpt.sparsify_weight(lin, {lin: H.clone()}, sparsity, n, m, bs, 0.01, False)
        return w

    if structure == "n:m":
        w, mask = sparsegpt_linear(W, H, sparsity=0.0, n=2, m=4, blocksize=bs)
        ref = theirs(0.0, 2, 4)
    else:
        w, mask = sparsegpt_linear(W, H, sparsity=0.5, blocksize=bs)
        # theirs prunes score <= sort(score)[k]: k + 1 per block; one more than ours each block
        plus_one = theirs(0.5, 0, 0) == 0
        assert bool(plus_one[mask].all())
        assert int(plus_one.sum()) - int(mask.sum()) == in_f // bs
        k = out_f * bs // 2
        ref = theirs((k - 0.5) / (out_f * bs), 0, 0)  # asks theirs for k - 1: it prunes k
    assert torch.equal(ref == 0, mask)
    assert torch.allclose(w, ref, rtol=1e-5, atol=1e-6)
