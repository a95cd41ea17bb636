"""hsr_core/sparsegpt.py's argument rules, counts and tie-breaking against values worked out by
hand (issue 18, mutation testing). Model-free and fast: the mutation run's tests beside
tests/test_core_sparsegpt.py, whose slow optimal-brain-surgeon loop checks the numbers.

With an identity Hessian every column's ``U_ii`` is the same and ``U`` is diagonal, so the
weights are never updated across columns and a matrix of ones is one big tie: the mask is then
the first ``k`` entries in row-major order of each block (unstructured) or the first ``n`` of
each group (N:M), as the docstrings promise.

The Hessians and the model loop (issue 18, item 4) against references just as slow: the
collector's ``X^T X`` written out by hand, the Hessians of a tiny Llama built in memory against
one sample at a time (float64, every selected input row kept), and the sequential masks against
full forward passes with one more layer pruned (and updated) each time; the tiny
Llama-3.2-Vision for the vision rows of its cross-attention ``k_proj`` / ``v_proj``.
"""

from __future__ import annotations

import types

import pytest
import torch
from oracles import Spy, memory_llama, selected_rows

# imported here, not in the fixtures: collecting the file then loads the model code (seconds),
# once for a mutation run's every mutant instead of once per mutant
from transformers import LlamaForCausalLM, MllamaForConditionalGeneration  # noqa: F401

from hsr_core import encoding
from hsr_core import sparsegpt as sg
from hsr_core.config import WandaConfig
from hsr_core.data import Sample, builtin_calibration, with_typographic_images
from hsr_core.hooks import HookSet, count_hooks
from hsr_core.models import LoadedModel
from hsr_core.progress import Cancelled
from hsr_core.sparsegpt import (
    HessianCollector,
    HessianError,
    hessians,
    sparsegpt_count,
    sparsegpt_linear,
    sparsegpt_masks,
)


def ties(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight of ones and an identity Hessian: every score equal."""
    return torch.ones(rows, cols), torch.eye(cols)


def test_unstructured_ties_go_to_the_earlier_entries_of_each_block():
    """1,024 tied entries a block (a sort that is not stable reorders ties from about 100)."""
    W, H = ties(16, 128)
    _, mask = sparsegpt_linear(W, H, sparsity=0.5, blocksize=64)
    expected = torch.zeros(16, 128, dtype=torch.bool)
    expected[:8, :] = True  # each block of 64 columns: the first 512 of 1,024, rows 0-7
    assert torch.equal(mask, expected)


def test_n_m_ties_go_to_the_earlier_inputs_of_each_group():
    """64 of every 128 inputs of each row: the first 64 (128 ties a row)."""
    W, H = ties(4, 256)
    _, mask = sparsegpt_linear(W, H, sparsity=0.0, n=64, m=128, blocksize=128)
    group = torch.tensor([True] * 64 + [False] * 64)
    assert torch.equal(mask, group.repeat(2).expand(4, 256))


def test_one_entry_is_pruned_when_one_is_asked_for():
    W, H = ties(1, 4)
    W[0, 2] = 0.5  # the lowest score
    w, mask = sparsegpt_linear(W, H, sparsity=0.25, blocksize=4)  # int(4 * 0.25) = 1
    assert mask.tolist() == [[False, False, True, False]]
    assert w[0, 2] == 0 and w[0, [0, 1, 3]].tolist() == [1.0, 1.0, 1.0]


def test_blocksize_one_is_a_block_of_one_column():
    """Each column its own block: ``int(rows * 1 * sparsity)`` of its rows, the lowest."""
    W = torch.tensor([[3.0, 1.0], [1.0, 3.0], [2.0, 2.0], [4.0, 0.5]])
    _, mask = sparsegpt_linear(W, torch.eye(2), sparsity=0.5, blocksize=1)
    assert mask.tolist() == [[False, True], [True, False], [True, False], [False, True]]
    with pytest.raises(ValueError, match=r"^blocksize must be >= 1, got 0$"):
        sparsegpt_linear(W, torch.eye(2), sparsity=0.5, blocksize=0)


@pytest.mark.parametrize(("n", "m"), [(0, 4), (2, 0)])
def test_a_pattern_with_a_zero_is_unstructured(n, m):
    """N:M needs both > 0; with either 0 the sparsity is read, as with neither given."""
    W, H = ties(4, 8)
    _, mask = sparsegpt_linear(W, H, sparsity=0.5, n=n, m=m, blocksize=8)
    _, plain = sparsegpt_linear(W, H, sparsity=0.5, blocksize=8)
    assert torch.equal(mask, plain) and int(mask.sum()) == 16
    assert sparsegpt_count((4, 8), sparsity=0.5, n=n, m=m, blocksize=8) == 16


@pytest.mark.parametrize(("n", "m"), [(1, 1), (4, 4), (5, 4)])
def test_n_must_be_below_m(n, m):
    W, H = ties(2, 8)
    with pytest.raises(ValueError, match=rf"^N:M pattern needs 1 <= N < M, got {n}:{m}$"):
        sparsegpt_linear(W, H, sparsity=0.0, n=n, m=m, blocksize=8)


def test_counts_by_hand():
    """Unstructured: ``int(rows * block * sparsity)`` per block of 128 columns (the default);
    N:M: n of every m inputs of each row. Whole numbers."""
    # 300 columns: blocks of 128, 128, 44 -> int(38.4) * 2 + int(13.2) = 89 (129: 88)
    assert sparsegpt_count((1, 300), sparsity=0.3) == 89
    count = sparsegpt_count((3, 12), sparsity=0.0, n=1, m=4, blocksize=4)
    assert count == 9 and type(count) is int
    assert type(sparsegpt_count((3, 300), sparsity=0.3)) is int
    W, H = torch.randn(1, 300), torch.eye(300)
    assert int(sparsegpt_linear(W, H, sparsity=0.3)[1].sum()) == 89


def test_a_hessian_that_is_not_positive_definite_is_explained():
    with pytest.raises(HessianError) as info:
        sparsegpt_linear(torch.ones(2, 3), -torch.eye(3), sparsity=0.5)
    assert str(info.value) == (
        "the damped Hessian is not positive definite (Cholesky failed); use more calibration "
        "samples (or tokens='all') or a larger percdamp"
    )


def test_masks_are_made_on_the_scores_device():
    """On the ``meta`` device (no data; every operation checks devices)."""
    from hsr_core.sparsegpt import _lowest_flat

    score = torch.empty(3, 4, device="meta")
    assert _lowest_flat(score, 5).device.type == "meta"


def test_bad_arguments_say_what_is_wrong():
    W, H = ties(2, 4)
    with pytest.raises(ValueError) as info:
        sparsegpt_linear(torch.ones(4), H, sparsity=0.5)
    assert str(info.value) == (
        "SparseGPT prunes a [out, in] matrix, got a weight of torch.Size([4])"
    )
    with pytest.raises(ValueError) as info:
        sparsegpt_linear(W, H, sparsity=0.5, percdamp=-0.1)
    assert str(info.value) == "percdamp must be >= 0, got -0.1"
    bad = H.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError) as info:
        sparsegpt_linear(W, bad, sparsity=0.5)
    assert str(info.value) == (
        "the Hessian is not finite (inf or NaN): the calibration activations overflowed; "
        "load the model in bfloat16 or float32"
    )


def test_the_math_runs_in_the_wider_of_the_two_dtypes():
    """float64 in either input means float64 math: the result equals the all-float64 one (cast
    to the weight's dtype), not the float32 one."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(64, 16, generator=g, dtype=torch.float64)
    H64 = 2 / 64 * X.T @ X
    W64 = torch.randn(6, 16, generator=g, dtype=torch.float64)
    want, want_mask = sparsegpt_linear(W64, H64, sparsity=0.5, blocksize=8)
    f32, _ = sparsegpt_linear(W64.float(), H64.float(), sparsity=0.5, blocksize=8)
    assert not torch.equal(f32.double(), want)  # the test can tell the two apart
    got, mask = sparsegpt_linear(W64, H64.float(), sparsity=0.5, blocksize=8)
    assert got.dtype == torch.float64 and torch.equal(mask, want_mask)
    assert torch.equal(
        got, sparsegpt_linear(W64, H64.float().double(), sparsity=0.5, blocksize=8)[0]
    )
    got, _ = sparsegpt_linear(W64.float(), H64, sparsity=0.5, blocksize=8)
    assert got.dtype == torch.float32
    assert torch.equal(
        got, sparsegpt_linear(W64.float().double(), H64, sparsity=0.5, blocksize=8)[0].float()
    )


# ---------------------------------------------------------------------------------------------
# the Hessian collector, by hand


def xtx(rows: torch.Tensor) -> torch.Tensor:
    rows = rows.double()
    return rows.T @ rows


def test_token_selection():
    batch = types.SimpleNamespace(
        response_mask=torch.tensor([[False, True, False]]),
        inputs={"attention_mask": torch.tensor([[1, 1, 0]])},
    )
    assert sg._token_selection(batch, "response").tolist() == [[False, True, False]]
    sel = sg._token_selection(batch, "all")
    assert sel.dtype == torch.bool and sel.tolist() == [[True, True, False]]  # no padding


def test_set_batch_selections():
    col = HessianCollector()
    assert col.set_batch(torch.ones(2, 3, dtype=torch.bool)) is True and col._rows is None
    assert col.set_batch(torch.zeros(2, 3, dtype=torch.bool)) is False
    sel = torch.tensor([[False, True, True], [True, False, False]])
    assert col.set_batch(sel) is True and col._rows.tolist() == [1, 2, 3]
    assert col._tiles is None and col._last is None
    one = torch.tensor([[False, False, False], [False, True, False]])
    assert col.set_batch(one) is True and col._rows.tolist() == [4]  # one token is enough
    col.set_batch(sel, torch.tensor([[[True, False]], [[False, True]]]))
    assert col._tiles.tolist() == [True, False, False, True]


def test_set_batch_forgets_the_last_batch():
    lin = torch.nn.Linear(2, 2)
    col = HessianCollector()
    col.set_batch(torch.ones(1, 1, dtype=torch.bool))
    x = torch.tensor([[[1.0, 2.0]]])
    col.hook("l")(lin, (x,))
    col.set_batch(torch.ones(1, 1, dtype=torch.bool))
    x[0, 0, 0] = 3.0  # the same tensor, new values: read again
    col.hook("l")(lin, (x,))
    assert col.sums["l"].tolist() == [[1.0 + 9.0, 2.0 + 6.0], [2.0 + 6.0, 4.0 + 4.0]]
    assert col.counts == {"l": 2}


def test_vision_rows_by_hand():
    col = HessianCollector()
    col.set_batch(torch.ones(1, 1, dtype=torch.bool))
    assert col._vision_rows(6) is None  # no tiles: every row
    col.set_batch(torch.ones(1, 1, dtype=torch.bool), torch.tensor([[[True, False, True]]]))
    assert col._vision_rows(6).tolist() == [0, 1, 4, 5]  # 2 rows a tile
    assert col._vision_rows(3).tolist() == [0, 2]
    with pytest.raises(RuntimeError, match=r"^7 vision rows do not split into 3 tiles$"):
        col._vision_rows(7)
    col.set_batch(torch.ones(1, 1, dtype=torch.bool), torch.ones(1, 1, 2, dtype=torch.bool))
    assert col._vision_rows(4) is None  # every tile seen


def test_hook_sums_x_xt_of_the_selected_tokens_and_hessians_scale_them():
    g = torch.Generator().manual_seed(4)
    q, k, o = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    col = HessianCollector()
    hq, hk, ho = col.hook("q"), col.hook("k"), col.hook("o")
    want = {
        "q": torch.zeros(4, 4, dtype=torch.float64),
        "o": torch.zeros(4, 4, dtype=torch.float64),
    }
    tokens = 0
    with torch.inference_mode():  # as the callers run them: the sums are inference tensors
        for sel in (
            torch.tensor([[True, False, True], [False, False, True]]),
            torch.ones(2, 3, dtype=torch.bool),
            torch.tensor([[False, True, False], [True, True, False]]),
        ):
            x, y = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
            before = x.clone()
            col.set_batch(sel)
            hq(q, (x,))
            hk(k, (x,))  # q and k read one tensor: one accumulator
            ho(o, (y,))
            assert torch.equal(x, before)
            want["q"] += xtx(x[sel])
            want["o"] += xtx(y[sel])
            tokens += int(sel.sum())
    assert set(col.sums) == {"q", "o"} and col.alias == {"k": "q"}
    assert col.counts == {"q": tokens, "o": tokens} and tokens == 3 + 6 + 3
    for name in ("q", "o"):
        assert col.sums[name].dtype == torch.float32
        assert torch.allclose(col.sums[name].double(), want[name], rtol=1e-5, atol=1e-6), name
    hs = col.hessians()  # outside inference mode
    assert set(hs) == {"q", "k", "o"} and hs["k"] is hs["q"] and hs["o"] is not hs["q"]
    for name in ("q", "o"):
        assert hs[name].dtype == torch.float32
        assert torch.allclose(hs[name].double(), 2 / tokens * want[name], rtol=1e-5, atol=1e-6)
    assert col.sums == {} and col.counts == {} and col.alias == {}  # emptied
    col.set_batch(torch.ones(1, 1, dtype=torch.bool))
    col.hook("o")(o, (torch.tensor([[[1.0, 0.0, 2.0, 0.0]]]),))
    assert col.hessians()["o"].tolist() == [  # 2/1 * x x^T, from zero again
        [2.0, 0.0, 4.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
        [4.0, 0.0, 8.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
    ]


def test_hook_reads_a_bfloat16_input_in_float32():
    lin = torch.nn.Linear(2, 2)
    col = HessianCollector()
    col.set_batch(torch.ones(1, 2, dtype=torch.bool))
    x = torch.tensor([[[300.0, 1.0], [400.0, 3.0]]], dtype=torch.bfloat16)
    col.hook("l")(lin, (x,))
    assert col.sums["l"].dtype == torch.float32
    assert col.sums["l"].tolist() == [[250000.0, 1500.0], [1500.0, 10.0]]  # exact in float32
    assert col.hessians()["l"].tolist() == [[250000.0, 1500.0], [1500.0, 10.0]]  # 2/2


def test_hook_sums_in_float32_whatever_the_default_dtype():
    lin = torch.nn.Linear(2, 2)
    col = HessianCollector()
    col.set_batch(torch.ones(1, 1, dtype=torch.bool))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        col.hook("l")(lin, (torch.tensor([[[1.0, 3.0]]], dtype=torch.float32),))
    finally:
        torch.set_default_dtype(default)
    assert col.sums["l"].dtype == torch.float32
    assert col.sums["l"].tolist() == [[1.0, 3.0], [3.0, 9.0]]


def test_inputs_shared_inconsistently_are_refused():
    lin = torch.nn.Linear(2, 2)
    sel = torch.ones(1, 1, dtype=torch.bool)
    x, y = torch.ones(1, 1, 2), torch.ones(1, 1, 2)

    def two_batches(first, second):
        col = HessianCollector()
        for batch in (first, second):
            col.set_batch(sel)
            for name, t in batch:
                col.hook(name)(lin, (t,))

    two_batches([("q", x), ("k", x)], [("q", y), ("k", y)])  # consistent: no error
    for first, second, name in [
        ([("q", x), ("k", x)], [("q", x), ("k", y)], "k"),  # k shared, then its own
        ([("q", x), ("o", y)], [("q", x), ("o", x)], "o"),  # o its own, then shared
        ([("q", x), ("k", x), ("o", y)], [("o", x), ("k", x)], "k"),  # k with another leader
    ]:
        with pytest.raises(RuntimeError) as e:
            two_batches(first, second)
        assert str(e.value) == f"{name} shares its input inconsistently across batches"


def test_hook_gathers_the_vision_rows_of_the_seen_tiles():
    lin = torch.nn.Linear(2, 2)
    col = HessianCollector(frozenset({"v"}))
    col.set_batch(torch.tensor([[True, False]]), torch.tensor([[[False, True]]]))
    states = torch.arange(8.0).view(2, 2, 2)  # [tiles, patches, hidden]: tile 1 is 4..7
    col.hook("v")(lin, (states,))
    assert col.sums["v"].tolist() == [[16.0 + 36.0, 20.0 + 42.0], [20.0 + 42.0, 25.0 + 49.0]]
    assert col.counts["v"] == 2
    col.hook("t")(lin, (torch.tensor([[[1.0, 2.0], [10.0, 20.0]]]),))  # text: token 0 only
    assert col.sums["t"].tolist() == [[1.0, 2.0], [2.0, 4.0]] and col.counts["t"] == 1
    col.set_batch(torch.tensor([[False, True]]))  # no tiles given: every vision row
    col.hook("v")(lin, (states,))
    assert col.counts["v"] == 6
    assert torch.equal(col.sums["v"].double(), xtx(states[1]) + xtx(states.view(4, 2)))


def test_hook_keeps_its_work_on_the_activations_device(monkeypatch):
    """On the ``meta`` device (no data, but every operation checks devices): the token and
    vision rows follow the activations, and so does the sum."""
    original = torch.Tensor.index_select

    def same_device(self, dim, index):  # CUDA's rule, which meta tensors do not check
        assert index.device == self.device, (index.device, self.device)
        return original(self, dim, index)

    monkeypatch.setattr(torch.Tensor, "index_select", same_device)
    lin = torch.nn.Linear(2, 2)
    col = HessianCollector(frozenset({"v"}))
    col.set_batch(torch.tensor([[True, False]]), torch.tensor([[[False, True]]]))
    col.hook("t")(lin, (torch.empty(1, 2, 2, device="meta"),))
    col.hook("v")(lin, (torch.empty(2, 3, 2, device="meta"),))
    assert col.sums["t"].device.type == col.sums["v"].device.type == "meta"
    assert col.sums["t"].shape == col.sums["v"].shape == (2, 2)
    assert col.counts == {"t": 1, "v": 3}


def _fake_loaded(cross: set[int]) -> types.SimpleNamespace:
    adapter = types.SimpleNamespace(
        cross_layers=frozenset(cross), linear_name=lambda l, p: f"layers.{l}.{p}"
    )
    return types.SimpleNamespace(adapter=adapter)


def test_vision_inputs_are_the_cross_attention_k_and_v():
    assert sg._vision_inputs(_fake_loaded(set())) == frozenset()
    got = sg._vision_inputs(_fake_loaded({1, 3}))
    assert isinstance(got, frozenset)
    assert got == {"layers.1.k_proj", "layers.1.v_proj", "layers.3.k_proj", "layers.3.v_proj"}


# ---------------------------------------------------------------------------------------------
# a tiny Llama built in memory


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    """The built-in tiny Llama's shape (2 layers, hidden 64, MLP 128), not saved or loaded;
    every test leaves its weights as they were (asserted where it prunes)."""
    return memory_llama()


def data(n: int) -> list[Sample]:
    return builtin_calibration().utility[:n]


def naive_hessians(loaded: LoadedModel, samples, tokens: str = "response", names=None):
    """``2/N X^T X`` the slow way (float64): ``selected_rows`` (one sample at a time, no
    padding, Mllama's cross-attention k/v over the patches of the tiles some token attends to),
    one product at the end."""
    seen = selected_rows(loaded, samples, tokens, names)
    out = {}
    for name, xs in seen.items():
        X = torch.cat(xs)
        out[name] = 2 / X.shape[0] * X.T @ X
    return out


def assert_close_hessians(fast, slow):
    assert fast.keys() == slow.keys()
    for name in fast:
        assert fast[name].dtype == torch.float32 and fast[name].device.type == "cpu"
        scale = slow[name].abs().max().item()
        assert torch.allclose(fast[name].double(), slow[name], rtol=1e-4, atol=1e-6 * scale), name


def naive_sequential(loaded: LoadedModel, samples, cfg: WandaConfig, *, blocksize, percdamp):
    """Sequential SparseGPT the slow way: full forward passes one sample at a time, layer ``i``'s
    Hessians taken with layers ``0..i-1`` holding their pruned, updated weights; each linear
    pruned by ``sparsegpt_linear`` (tested on its own above and in test_core_sparsegpt)."""
    a = loaded.adapter
    mods = {n: m for n, _, _, m in a.iter_linears()}
    dense = {n: m.weight.detach().clone() for n, m in mods.items()}
    n, m = (cfg.n, cfg.m) if cfg.structure == "n:m" else (0, 0)
    masks, weights = {}, {}
    try:
        for layer in range(a.num_layers):
            names = [name for name, l, _, _ in a.iter_linears() if l == layer]
            hs = naive_hessians(loaded, samples, cfg.tokens, names)
            for name in names:
                weights[name], masks[name] = sparsegpt_linear(
                    mods[name].weight,
                    hs[name].float(),
                    sparsity=cfg.sparsity,
                    n=n,
                    m=m,
                    blocksize=blocksize,
                    percdamp=percdamp,
                )
            with torch.no_grad():
                for name in names:
                    mods[name].weight.copy_(weights[name])
    finally:
        with torch.no_grad():
            for name, mod in mods.items():
                mod.weight.copy_(dense[name])
    return masks, weights


def dense_weights(loaded):
    return {n: m.weight.detach().clone() for n, _, _, m in loaded.adapter.iter_linears()}


def empty_out(loaded):
    return {n: torch.full_like(m.weight, 7.0) for n, _, _, m in loaded.adapter.iter_linears()}


class Polls:
    """A stop flag that counts its polls and says stop at poll ``stop_at`` (never: None)."""

    def __init__(self, stop_at=None):
        self.count, self.stop_at = 0, stop_at

    def __call__(self) -> bool:
        self.count += 1
        return self.count == self.stop_at


@pytest.mark.parametrize("tokens", ["response", "all"])
def test_hessians_equal_one_sample_at_a_time(llama, tokens, monkeypatch):
    moved = Spy(monkeypatch, encoding.Batch, "to")
    samples = data(5)  # batches of 2, 2, 1: padded
    polls = Polls()
    fast = hessians(llama, samples, WandaConfig(tokens=tokens, batch_size=2), should_stop=polls)
    assert_close_hessians(fast, naive_hessians(llama, samples, tokens))
    a = llama.adapter
    assert len(fast) == 14 and polls.count == 3
    for layer in (0, 1):
        q, k, v = (a.linear_name(layer, p) for p in ("q_proj", "k_proj", "v_proj"))
        assert fast[k] is fast[q] and fast[v] is fast[q]
    assert [args[1] for args, _ in moved.calls] == [llama.device] * 3
    assert count_hooks(llama.model) == 0


def test_hessians_of_some_linears_skip_batches_without_tokens(llama):
    a = llama.adapter
    names = [a.linear_name(1, "o_proj"), a.linear_name(0, "down_proj")]
    samples = data(4)
    mixed = [Sample(samples[0].prompt), samples[1], Sample(samples[2].prompt), samples[3]]
    passes = []
    with HookSet() as hooks:
        hooks.pre(a.layers[0], lambda *_: passes.append(1))
        fast = hessians(llama, mixed, WandaConfig(batch_size=1), names=names)
    assert len(passes) == 2  # the batches with no answer are not run
    assert_close_hessians(fast, naive_hessians(llama, [samples[1], samples[3]], names=names))


def test_hessians_errors_and_stop(llama):
    with pytest.raises(KeyError) as e:
        hessians(llama, data(1), WandaConfig(), names=["a", "b", "c", "d"])
    assert e.value.args[0] == "not decoder linears of this model: ['a', 'b', 'c']"
    with pytest.raises(ValueError) as e:
        hessians(llama, [Sample(s.prompt) for s in data(2)], WandaConfig())
    assert str(e.value) == (
        "no calibration tokens were selected: the samples have no responses; "
        "give answers or use tokens='all'"
    )
    polls = Polls(stop_at=2)
    with pytest.raises(Cancelled):
        hessians(llama, data(4), WandaConfig(batch_size=1), should_stop=polls)
    assert polls.count == 2 and count_hooks(llama.model) == 0


@pytest.mark.parametrize(
    ("structure", "tokens", "blocksize", "percdamp"),
    [("unstructured", "response", 16, 0.05), ("n:m", "all", 32, 0.2)],
)
def test_sequential_masks_equal_full_passes_pruned_a_layer_at_a_time(
    llama, monkeypatch, structure, tokens, blocksize, percdamp
):
    samples = data(5)
    # 0.45: int(32 * 16 * 0.45) * 4 = 920 of k_proj's 32 x 64, not int(32 * 64 * 0.45) = 921:
    # the count follows the blocks
    cfg = WandaConfig(sparsity=0.45, structure=structure, tokens=tokens, batch_size=2)
    dense = dense_weights(llama)
    bars = Spy(monkeypatch, sg, "bar")
    moved = Spy(monkeypatch, encoding.Batch, "to")
    polls = Polls()
    out = empty_out(llama)
    masks = sparsegpt_masks(
        llama, samples, cfg, out=out, blocksize=blocksize, percdamp=percdamp, should_stop=polls
    )
    assert [kw for _, kw in bars.calls] == [{"desc": "SparseGPT", "unit": "layer"}]
    assert [args[1] for args, _ in moved.calls] == [llama.device] * 3
    assert polls.count == 3 + 2 * (1 + 7)  # each batch, each layer, each linear
    assert count_hooks(llama.model) == 0
    for name, _, _, mod in llama.adapter.iter_linears():
        assert torch.equal(mod.weight, dense[name]), name
    slow_masks, slow_weights = naive_sequential(
        llama, samples, cfg, blocksize=blocksize, percdamp=percdamp
    )
    assert masks.keys() == slow_masks.keys() and len(masks) == 14
    for name, mask in slow_masks.items():
        assert torch.equal(masks[name].unpack(), mask), name
        assert masks[name].count == int(mask.sum()), name
        assert torch.allclose(out[name], slow_weights[name], rtol=1e-3, atol=1e-5), name


def test_sequential_masks_defaults(llama, monkeypatch):
    pruned = Spy(monkeypatch, sg, "sparsegpt_linear")
    counted = Spy(monkeypatch, sg, "sparsegpt_count")
    sparsegpt_masks(llama, data(2), WandaConfig(sparsity=0.3), out=empty_out(llama))
    want = dict(sparsity=0.3, n=0, m=0, blocksize=128, percdamp=0.01)
    assert len(pruned.calls) == 14 and all(kw == want for _, kw in pruned.calls)
    no_damp = {k: v for k, v in want.items() if k != "percdamp"}
    assert len(counted.calls) == 2 * 14 and all(kw == no_damp for _, kw in counted.calls)


def test_sequential_masks_stop_between_linears(llama):
    dense = dense_weights(llama)
    out = empty_out(llama)
    polls = Polls(stop_at=2 + 1 + 3)  # 2 batches, layer 0, its third linear (v_proj)
    with pytest.raises(Cancelled):
        sparsegpt_masks(llama, data(2), WandaConfig(batch_size=1), out=out, should_stop=polls)
    assert polls.count == 6 and count_hooks(llama.model) == 0
    a = llama.adapter
    written = [n for n in out if not bool((out[n] == 7.0).all())]
    assert written == [a.linear_name(0, "q_proj"), a.linear_name(0, "k_proj")]
    for name, _, _, mod in a.iter_linears():
        assert torch.equal(mod.weight, dense[name]), name


def test_sequential_masks_errors_name_the_linear(llama, monkeypatch):
    q = llama.adapter.linear_name(0, "q_proj")
    short = [Sample(data(1)[0].prompt, response="Yes.")]  # rank < 64; undamped: singular
    with pytest.raises(HessianError) as e:
        sparsegpt_masks(llama, short, WandaConfig(), out=empty_out(llama), percdamp=0.0)
    assert str(e.value) == (
        f"SparseGPT on {q}: the damped Hessian is not positive definite (Cholesky failed); "
        "use more calibration samples (or tokens='all') or a larger percdamp"
    )
    with pytest.raises(ValueError) as e:
        sparsegpt_masks(
            llama, [Sample(s.prompt) for s in data(2)], WandaConfig(), out=empty_out(llama)
        )
    assert str(e.value) == (
        "no calibration tokens were selected: the samples have no responses; "
        "give answers or use tokens='all'"
    )
    original = HessianCollector.hessians

    def broken(self):
        hs = original(self)
        with torch.inference_mode():  # the sums were made under it
            hs[next(iter(hs))][0, 0] = float("nan")
        return hs

    monkeypatch.setattr(HessianCollector, "hessians", broken)
    with pytest.raises(ValueError) as e:
        sparsegpt_masks(llama, data(1), WandaConfig(), out=empty_out(llama))
    assert str(e.value) == (
        f"SparseGPT on {q}: the Hessian is not finite (inf or NaN): the calibration "
        "activations overflowed; load the model in bfloat16 or float32"
    )
    assert count_hooks(llama.model) == 0


def test_check_out_refuses_before_any_work(llama):
    a = llama.adapter
    q, k = a.linear_name(0, "q_proj"), a.linear_name(0, "k_proj")
    out = empty_out(llama)

    def cfg(**kw):
        return types.SimpleNamespace(**{"structure": "unstructured", "sparsity": 0.5, **kw})

    sg._check_out(llama, out, cfg(n=1, m=3), 6)  # unstructured: the pattern is not read
    sg._check_out(llama, out, cfg(structure="n:m", n=1, m=4), 8)
    for c, blocksize, msg in [
        (cfg(structure="n:m", n=1, m=3), 6, "N:M masks need in_features (64) divisible by M (3)"),
        (
            cfg(structure="n:m", n=1, m=4),
            6,
            "SparseGPT's N:M groups need blocksize (6) divisible by M",
        ),
        (cfg(), 0, "blocksize must be >= 1, got 0"),
        (cfg(sparsity=1.0), 128, "sparsity must be a fraction in [0, 1), got 1.0"),
    ]:
        with pytest.raises(ValueError) as e:
            sg._check_out(llama, out, c, blocksize)
        assert str(e.value) == f"SparseGPT on {q}: {msg}"
    with pytest.raises(ValueError) as e:
        sg._check_out(llama, {q: out[q]}, cfg(), 128)
    assert str(e.value) == f"no output tensor for {k}: preallocate one per decoder linear"
    for bad, shown in [
        (torch.zeros(64, 32), "(64, 32) torch.float32"),
        (torch.zeros(32, 64, dtype=torch.float64), "(32, 64) torch.float64"),
    ]:
        with pytest.raises(ValueError) as e:
            sg._check_out(llama, {**out, k: bad}, cfg(), 128)
        assert str(e.value) == (
            f"the output tensor for {k} is {shown}; the weight is (32, 64) torch.float32"
        )


# ---------------------------------------------------------------------------------------------
# the tiny Llama-3.2-Vision: cross-attention k/v read the vision states


@pytest.mark.parametrize("tokens", ["response", "all"])
def test_vision_hessians_equal_one_sample_at_a_time(tiny_mllama, tokens):
    samples = with_typographic_images(data(3))
    fast = hessians(tiny_mllama, samples, WandaConfig(tokens=tokens, batch_size=2))
    assert_close_hessians(fast, naive_hessians(tiny_mllama, samples, tokens))


def test_vision_sequential_masks_equal_full_passes(tiny_mllama):
    """Batches with and without an image: the cross-attention layer runs on (and is pruned
    from) those with one only."""
    pictured = with_typographic_images(data(3))
    samples = [pictured[0], *data(5)[3:], pictured[1], pictured[2]]
    cfg = WandaConfig(sparsity=0.5, batch_size=2)
    out = empty_out(tiny_mllama)
    masks = sparsegpt_masks(tiny_mllama, samples, cfg, out=out, blocksize=32)
    slow_masks, slow_weights = naive_sequential(
        tiny_mllama, samples, cfg, blocksize=32, percdamp=0.01
    )
    assert masks.keys() == slow_masks.keys()
    for name, mask in slow_masks.items():
        assert torch.equal(masks[name].unpack(), mask), name
        assert torch.allclose(out[name], slow_weights[name], rtol=1e-3, atol=1e-5), name


def test_vision_layers_without_images_are_a_clear_error(tiny_mllama):
    msg = "the cross-attention layers \\[2\\] never ran"
    with pytest.raises(ValueError, match=msg):
        hessians(tiny_mllama, data(2), WandaConfig())
    with pytest.raises(ValueError, match=msg):
        sparsegpt_masks(tiny_mllama, data(2), WandaConfig(), out=empty_out(tiny_mllama))


def test_weights_swapped_for_the_duration_then_put_back_bit_exactly():
    g = torch.Generator().manual_seed(2)
    a, b = torch.nn.Linear(3, 2, bias=False), torch.nn.Linear(2, 2, bias=False)
    before = {"a": a.weight.detach().clone(), "b": b.weight.detach().clone()}
    values = {"a": torch.randn(2, 3, generator=g), "b": torch.randn(2, 2, generator=g)}
    with sg._weights_swapped({"a": a, "b": b}, values):
        assert torch.equal(a.weight, values["a"]) and torch.equal(b.weight, values["b"])
    assert torch.equal(a.weight, before["a"]) and torch.equal(b.weight, before["b"])
    with pytest.raises(RuntimeError, match="^boom$"), sg._weights_swapped({"a": a, "b": b}, values):
        raise RuntimeError("boom")
    assert torch.equal(a.weight, before["a"]) and torch.equal(b.weight, before["b"])
    assert a.weight.requires_grad and a.weight.grad_fn is None  # still a plain parameter
