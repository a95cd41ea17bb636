"""Wanda (``hsr_core.wanda``) against slow, obvious references: fast enough for mutation runs.

Pure tensors first (masks against per-row sorts, the norm collector against sums written
out), then a tiny Llama built in memory (no save, no load: norms against one-sample-at-a-time
column norms, sequential masks against full forward passes pruned a layer at a time, the
multi-process path with a scripted two-process world), then the tiny Llama-3.2-Vision for the
vision rows of its cross-attention ``k_proj`` / ``v_proj``.
"""

from __future__ import annotations

import itertools
import types

import pytest
import torch
from oracles import (
    Spy,
    memory_llama,
    naive_norms,
    pruned_layer_by_layer,
    slow_nm_mask,
    slow_row_mask,
)

# imported here, not in the fixtures: collecting the file then loads the model code (seconds),
# once for a mutation run's every mutant instead of once per mutant
from transformers import LlamaForCausalLM, MllamaForConditionalGeneration  # noqa: F401

from hsr_core import encoding, wanda
from hsr_core.config import WandaConfig
from hsr_core.data import Sample, builtin_calibration, with_typographic_images
from hsr_core.distributed import World
from hsr_core.hooks import HookSet, count_hooks
from hsr_core.models import LoadedModel
from hsr_core.progress import Cancelled
from hsr_core.wanda import (
    _NormCollector,
    check_all_ran,
    check_finite,
    compute_masks,
    kth_smallest,
    lowest_k,
    mask_count,
    mask_from_scores,
    prune_masks,
    sequential_masks,
    vision_tiles,
    wanda_norms,
    wanda_score,
)

# ---------------------------------------------------------------------------------------------
# slow references


def random_scores(g: torch.Generator, out_f: int, in_f: int, kind: str) -> torch.Tensor:
    if kind == "continuous":
        return torch.rand(out_f, in_f, generator=g)
    if kind == "few values":  # most entries tie with the threshold
        return torch.randint(0, 3, (out_f, in_f), generator=g).float()
    score = torch.rand(out_f, in_f, generator=g)  # ties planted in some rows only
    for row in range(0, out_f, 3):
        score[row, torch.randperm(in_f, generator=g)[:4]] = score[row].median()
    return score


# ---------------------------------------------------------------------------------------------
# masks


@pytest.mark.parametrize("kind", ["continuous", "few values", "planted ties"])
def test_unstructured_masks_equal_a_per_row_sort(kind):
    g = torch.Generator().manual_seed(len(kind))
    for out_f, in_f in [(5, 8), (9, 13), (3, 40)]:
        score = random_scores(g, out_f, in_f, kind)
        for sparsity in (0.0, 0.05, 0.3, 0.5, 0.77, 0.99):
            cfg = WandaConfig(sparsity=sparsity)
            k = int(in_f * sparsity)
            mask = mask_from_scores(score, cfg)
            assert mask.dtype == torch.bool and mask.shape == score.shape
            assert torch.equal(mask, slow_row_mask(score, k)), (kind, in_f, sparsity)
            assert mask_count(score.shape, cfg) == out_f * k == int(mask.sum())


def test_lowest_k_at_its_ends():
    g = torch.Generator().manual_seed(5)
    score = torch.rand(4, 6, generator=g)
    score[2] = 1.0  # one value throughout: ties everywhere
    for k in (-2, -1, 0):
        assert torch.equal(lowest_k(score, k), torch.zeros(4, 6, dtype=torch.bool))
    for k in (6, 7, 30):
        assert torch.equal(lowest_k(score, k), torch.ones(4, 6, dtype=torch.bool))
    for k in range(1, 6):
        assert torch.equal(lowest_k(score, k), slow_row_mask(score, k)), k
    assert lowest_k(score, 0).dtype == lowest_k(score, 6).dtype == torch.bool


def test_lowest_k_takes_the_first_ties_in_column_order():
    score = torch.tensor(
        [
            [3.0, 1.0, 2.0, 1.0, 2.0, 2.0],  # k = 3: 1, 1, then the first 2 (column 2)
            [2.0, 2.0, 2.0, 2.0, 2.0, 2.0],  # all tied: columns 0, 1, 2
            [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # no tie: columns 3, 4, 5
        ]
    )
    expected = torch.tensor(
        [
            [False, True, True, True, False, False],
            [True, True, True, False, False, False],
            [False, False, False, True, True, True],
        ]
    )
    assert torch.equal(lowest_k(score, 3), expected)


def test_nan_scores_are_a_clear_error_and_a_few_nan_are_not():
    score = torch.rand(4, 10, generator=torch.Generator().manual_seed(1))
    score[1, :8] = float("nan")  # 2 numbers for k = 5: that row cannot take 5
    with pytest.raises(ValueError) as e:
        lowest_k(score, 5)
    assert str(e.value) == (
        "Wanda scores are not finite (NaN): a weight or a calibration statistic is inf or "
        "NaN; load the model in bfloat16 or float32 and check its weights"
    )
    for k in (10, 11):  # every entry taken: NaN or not
        assert torch.equal(lowest_k(score, k), torch.ones(4, 10, dtype=torch.bool))
    ok = torch.rand(3, 10, generator=torch.Generator().manual_seed(2))
    ok[0, 9] = float("nan")  # the row still has its 5 lowest numbers
    assert torch.equal(lowest_k(ok, 5), slow_row_mask(torch.nan_to_num(ok, nan=9.0), 5))


@pytest.mark.parametrize("nm", [(1, 4), (2, 4), (3, 4), (4, 8), (1, 2)])
def test_nm_masks_equal_brute_force(nm):
    n, m = nm
    g = torch.Generator().manual_seed(10 * n + m)
    for kind in ("continuous", "few values"):
        score = random_scores(g, 7, 4 * m, kind)
        cfg = WandaConfig(structure="n:m", n=n, m=m, sparsity=0.9)  # sparsity ignored
        mask = mask_from_scores(score, cfg)
        assert mask.dtype == torch.bool and mask.shape == score.shape
        assert torch.equal(mask, slow_nm_mask(score, n, m)), kind
        assert mask_count(score.shape, cfg) == 7 * 4 * n == int(mask.sum())


@pytest.mark.parametrize("m", [32, 64])
def test_wide_nm_groups_break_ties_by_position(m):
    """Groups of many tied scores: an unstable sort would take any of them."""
    g = torch.Generator().manual_seed(m)
    score = torch.randint(0, 2, (6, 2 * m), generator=g).float()
    score[0] = 0.0
    for n in (1, m // 4, m - 1):
        mask = mask_from_scores(score, WandaConfig(structure="n:m", n=n, m=m))
        assert torch.equal(mask, slow_nm_mask(score, n, m)), n


def test_nm_needs_in_features_divisible_by_m():
    with pytest.raises(
        ValueError, match=r"^N:M masks need in_features \(6\) divisible by M \(4\)$"
    ):
        mask_from_scores(torch.rand(2, 6), WandaConfig(structure="n:m", n=2, m=4))


def test_mask_count_by_hand():
    assert mask_count((3, 10), WandaConfig(sparsity=0.5)) == 15
    assert mask_count((3, 10), WandaConfig(sparsity=0.29)) == 6  # floor(2.9) = 2 a row
    assert mask_count((2, 7), WandaConfig(sparsity=0.0)) == 0
    assert mask_count((2, 7), WandaConfig(sparsity=0.99)) == 12  # floor(6.93) = 6
    assert mask_count((5, 16), WandaConfig(structure="n:m", n=2, m=4)) == 40
    assert mask_count((5, 16), WandaConfig(structure="n:m", n=1, m=8)) == 10
    assert mask_count((1, 18), WandaConfig(structure="n:m", n=3, m=4)) == 12  # 4 whole groups


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kth_smallest_both_ways_equal_a_sort(seed):
    g = torch.Generator().manual_seed(seed)
    for score in (
        torch.rand(6, 20, generator=g),
        torch.randint(0, 4, (5, 21), generator=g).float(),
    ):
        n = score.shape[1]
        for k in (1, 2, 9, n - 1, n):
            by_sort = score.sort(dim=1).values[:, k - 1 : k]
            for way in (None, False, True):
                got = kth_smallest(score, k, use_topk=way)
                assert got.shape == (score.shape[0], 1) and torch.equal(got, by_sort), (k, way)


def test_wanda_score_is_abs_weight_times_norm_in_float32():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 7, generator=g, requires_grad=True)
    norm = torch.rand(7, generator=g, dtype=torch.float64) * 3
    score = wanda_score(w, norm)
    assert score.dtype == torch.float32 and not score.requires_grad
    for i, j in itertools.product(range(5), range(7)):
        assert score[i, j].item() == pytest.approx(abs(w[i, j].item()) * norm[j].item(), rel=1e-6)
    on_meta = wanda_score(torch.empty(5, 7, device="meta"), norm)  # the norm follows
    assert on_meta.device.type == "meta" and on_meta.dtype == torch.float32
    half = w.detach().to(torch.bfloat16)
    assert torch.equal(wanda_score(half, norm), half.abs().float() * norm.float()[None, :])


def test_check_finite():
    check_finite("a", torch.tensor([0.0, 1.0, 1e30]))
    for bad in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(ValueError) as e:
            check_finite("lin.x", torch.tensor([1.0, bad]))
        assert str(e.value) == (
            "the Wanda statistics of lin.x are not finite (inf or NaN): the calibration "
            "activations overflowed; load the model in bfloat16 or float32"
        )


# ---------------------------------------------------------------------------------------------
# the norm collector, by hand


def test_set_batch_selections():
    col = _NormCollector({})
    assert col.set_batch(torch.ones(2, 3, dtype=torch.bool)) is True and col._rows is None
    assert col.set_batch(torch.zeros(2, 3, dtype=torch.bool)) is False
    sel = torch.tensor([[False, True, True], [True, False, False]])
    assert col.set_batch(sel) is True and col._rows.tolist() == [1, 2, 3]
    assert col._weights is None and col._tiles is None
    one = torch.tensor([[False, False, False], [False, True, False]])
    assert col.set_batch(one) is True and col._rows.tolist() == [4]  # one token is enough
    col.set_batch(sel, torch.tensor([[[True, False]], [[False, True]]]))
    assert col._tiles.tolist() == [True, False, False, True]


def test_set_batch_weighted_sum_way(monkeypatch):
    monkeypatch.setattr(_NormCollector, "weighted_sum", True)
    col = _NormCollector({})
    sel = torch.tensor([[False, True], [False, False]])
    assert col.set_batch(sel) is True
    assert col._rows is None and col._weights.tolist() == [False, True, False, False]
    assert col.set_batch(torch.zeros(2, 2, dtype=torch.bool)) is False


def test_set_batch_forgets_the_last_batch():
    lin = torch.nn.Linear(3, 2)
    col = _NormCollector({"l": lin})
    col.set_batch(torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 1, 2, dtype=torch.bool))
    x = torch.ones(1, 2, 3)
    col.hook("l")(lin, (x,))
    assert col.vision_rows(4) is None and col._vision_rows == {4: None}
    col.set_batch(torch.tensor([[True, False]]))
    assert col._tiles is None and col._vision_rows == {} and col._last is None
    x[0, 0] = 2.0  # the same tensor, new values: read again
    col.hook("l")(lin, (x,))
    assert col.sums["l"].tolist() == [1 + 1 + 4, 1 + 1 + 4, 1 + 1 + 4]


def test_vision_rows_by_hand():
    col = _NormCollector({})
    assert col.vision_rows(6) is None  # no tiles: every row
    col.set_batch(torch.ones(1, 1, dtype=torch.bool), torch.tensor([[[True, False, True]]]))
    assert col.vision_rows(6).tolist() == [0, 1, 4, 5]  # 2 rows a tile
    assert col.vision_rows(3).tolist() == [0, 2]
    assert col.vision_rows(6) is col.vision_rows(6)  # found once per batch
    with pytest.raises(RuntimeError, match=r"^7 vision rows do not split into 3 tiles$"):
        col.vision_rows(7)
    col.set_batch(torch.ones(1, 1, dtype=torch.bool), torch.ones(1, 1, 2, dtype=torch.bool))
    assert col.vision_rows(4) is None  # every tile seen


def squares(rows: torch.Tensor) -> torch.Tensor:
    return (rows.double() ** 2).sum(dim=0)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_hook_sums_squares_of_the_selected_tokens(monkeypatch, fused, weighted):
    monkeypatch.setattr(_NormCollector, "fused_norm", fused)
    monkeypatch.setattr(_NormCollector, "weighted_sum", weighted)
    g = torch.Generator().manual_seed(4)
    q, k, o = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    col = _NormCollector({"q": q, "k": k, "o": o})
    hq, hk, ho = col.hook("q"), col.hook("k"), col.hook("o")
    expected = {"q": torch.zeros(4, dtype=torch.float64), "o": torch.zeros(4, dtype=torch.float64)}
    for sel in (
        torch.tensor([[True, False, True], [False, False, True]]),
        torch.ones(2, 3, dtype=torch.bool),
        torch.tensor([[False, True, False], [True, True, False]]),
    ):
        x, y = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
        before = x.clone()
        col.set_batch(sel)
        hq(q, (x,))
        hk(k, (x,))  # q and k read one tensor
        ho(o, (y,))
        assert torch.equal(x, before)  # the activations are never squared in place
        expected["q"] += squares(x[sel])
        expected["o"] += squares(y[sel])
    for name, want in [("q", expected["q"]), ("k", expected["q"]), ("o", expected["o"])]:
        assert col.sums[name].dtype == torch.float32
        assert torch.allclose(col.sums[name].double(), want, rtol=1e-5), name
    assert col.sums["q"] is not col.sums["k"]
    norms = col.norms()
    assert set(norms) == {"q", "k", "o"}
    assert torch.allclose(norms["o"].double(), expected["o"].sqrt(), rtol=1e-5)
    assert norms["o"].device.type == "cpu"


@pytest.mark.parametrize("fused", [False, True])
def test_hook_reads_a_bfloat16_input_in_float32(monkeypatch, fused):
    monkeypatch.setattr(_NormCollector, "fused_norm", fused)
    lin = torch.nn.Linear(3, 2)
    col = _NormCollector({"l": lin})
    col.set_batch(torch.ones(1, 2, dtype=torch.bool))
    x = torch.tensor([[[300.0, 1.0, 2.0], [400.0, 3.0, 0.5]]], dtype=torch.bfloat16)
    col.hook("l")(lin, (x,))
    assert col.sums["l"].dtype == torch.float32
    assert col.sums["l"].tolist() == [250000.0, 10.0, 4.25]  # 90000 + 160000: exact in float32


def test_hook_gathers_the_vision_rows_of_the_seen_tiles():
    lin = torch.nn.Linear(2, 2)
    col = _NormCollector({"v": lin, "t": lin}, vision_inputs=frozenset({"v"}))
    tiles = torch.tensor([[[False, True]]])  # one image, its second tile seen
    col.set_batch(torch.tensor([[True, False]]), tiles)
    states = torch.arange(8.0).view(2, 2, 2)  # [tiles, patches, hidden]
    before = states.clone()
    col.hook("v")(lin, (states,))
    assert col.sums["v"].tolist() == [4 * 4 + 6 * 6, 5 * 5 + 7 * 7]  # tile 1's patches
    text = torch.tensor([[[1.0, 2.0], [10.0, 20.0]]])
    col.hook("t")(lin, (text,))  # a text linear: its selected token only
    assert col.sums["t"].tolist() == [1.0, 4.0]
    col.set_batch(torch.tensor([[False, True]]))  # no tiles given: every vision row
    col.hook("v")(lin, (states,))
    assert torch.equal(states, before)
    assert col.sums["v"].tolist() == [52 + 0 + 4 + 16 + 36, 74 + 1 + 9 + 25 + 49]


@pytest.mark.parametrize("weighted", [False, True])
def test_hook_moves_its_indices_to_the_activations_device(monkeypatch, weighted):
    """On the ``meta`` device (no data, but every operation checks devices): the token
    indices, the 0/1 weights and the vision rows follow the activations."""
    monkeypatch.setattr(_NormCollector, "weighted_sum", weighted)
    original = torch.Tensor.index_select

    def same_device(self, dim, index):  # CUDA's rule, which meta tensors do not check
        assert index.device == self.device, (index.device, self.device)
        return original(self, dim, index)

    monkeypatch.setattr(torch.Tensor, "index_select", same_device)
    lin = torch.nn.Linear(2, 2)
    col = _NormCollector({"t": lin, "v": lin}, vision_inputs=frozenset({"v"}))
    col.set_batch(torch.tensor([[True, False]]), torch.tensor([[[False, True]]]))
    col.hook("t")(lin, (torch.empty(1, 2, 2, device="meta"),))
    col.hook("v")(lin, (torch.empty(2, 3, 2, device="meta"),))
    assert col.sums["t"].device.type == col.sums["v"].device.type == "meta"
    assert col.sums["t"].shape == col.sums["v"].shape == (2,)


def test_partials_are_recorded_then_added_in_order():
    lin = torch.nn.Linear(2, 2)
    col = _NormCollector({"a": lin, "b": lin})
    col.partials = []
    col.set_batch(torch.ones(1, 1, dtype=torch.bool))
    x = torch.tensor([[[1.0, 2.0]]])
    col.hook("a")(lin, (x,))
    col.hook("b")(lin, (x * 3,))
    assert col.sums == {}
    assert [(n, t.tolist()) for n, t in col.partials] == [("a", [1.0, 4.0]), ("b", [9.0, 36.0])]
    main = _NormCollector({})
    shared = torch.tensor([1.0, 1.0])
    main.add_partials([("a", shared), ("b", torch.tensor([2.0, 0.0])), ("a", shared)])
    assert main.sums["a"].tolist() == [2.0, 2.0] and main.sums["b"].tolist() == [2.0, 0.0]
    assert shared.tolist() == [1.0, 1.0]  # the first call's tensor copied, not added into


@pytest.mark.parametrize("fused", [False, True])
def test_sum_of_squares_leaves_what_it_does_not_own(monkeypatch, fused):
    monkeypatch.setattr(_NormCollector, "fused_norm", fused)
    col = _NormCollector({})
    xs = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    for owned in (False, True):
        x = xs.clone()
        out = col._sum_of_squares(x, owned=owned)
        assert out.dtype == torch.float32 and out.tolist() == [10.0, 4.25]
        if not owned:
            assert torch.equal(x, xs)


def test_token_selection():
    batch = types.SimpleNamespace(
        response_mask=torch.tensor([[False, True]]),
        inputs={"attention_mask": torch.tensor([[1, 0]])},
    )
    assert wanda._token_selection(batch, "response").tolist() == [[False, True]]
    sel = wanda._token_selection(batch, "all")
    assert sel.dtype == torch.bool and sel.tolist() == [[True, False]]


def test_vision_tiles_by_hand():
    assert vision_tiles({"attention_mask": torch.ones(1, 2)}) is None
    cam = torch.zeros(2, 3, 1, 2, dtype=torch.long)  # [batch, seq, images, tiles]
    cam[0, 0, 0, 0] = 1  # row 0: token 0 sees tile 0
    cam[0, 2, 0, 1] = 1  # row 0: token 2 (padding) sees tile 1: not counted
    cam[1, 1, 0, 1] = 1  # row 1: token 1 sees tile 1
    att = torch.tensor([[1, 1, 0], [1, 1, 1]])
    tiles = vision_tiles({"attention_mask": att, "cross_attention_mask": cam})
    assert tiles.dtype == torch.bool
    assert tiles.tolist() == [[[True, False]], [[False, True]]]


def _fake_loaded(cross: set[int]) -> types.SimpleNamespace:
    adapter = types.SimpleNamespace(
        cross_layers=frozenset(cross),
        linear_name=lambda l, p: f"layers.{l}.{p}",
        parse=lambda name: (int(name.split(".")[1]), name.split(".")[2]),
        layer_kind=lambda l: "cross" if l in cross else "self",
    )
    return types.SimpleNamespace(adapter=adapter)


def test_vision_inputs_are_the_cross_attention_k_and_v():
    assert wanda._vision_inputs(_fake_loaded(set())) == frozenset()
    assert wanda._vision_inputs(_fake_loaded({1, 3})) == {
        "layers.1.k_proj",
        "layers.1.v_proj",
        "layers.3.k_proj",
        "layers.3.v_proj",
    }


def test_check_all_ran_messages():
    loaded = _fake_loaded({2, 5})
    names = ["layers.0.q_proj", "layers.1.up_proj", "layers.2.k_proj", "layers.5.v_proj"]
    names.append("layers.5.o_proj")
    check_all_ran(loaded, names, set(names) | {"other"})
    with pytest.raises(ValueError) as e:
        check_all_ran(loaded, names, {"layers.0.q_proj", "layers.1.up_proj"})
    assert str(e.value) == (
        "the cross-attention layers [2, 5] never ran on the calibration samples: "
        "Llama-3.2-Vision runs them only for inputs with an image; give samples with "
        "images (the pipeline gives a vision model typographic ones)"
    )
    with pytest.raises(ValueError) as e:
        check_all_ran(loaded, names, {"layers.5.v_proj"})
    assert str(e.value) == (
        "no calibration statistics for ['layers.0.q_proj', 'layers.1.up_proj', "
        "'layers.2.k_proj']: those linears never ran"
    )


# ---------------------------------------------------------------------------------------------
# a tiny Llama built in memory


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    """The built-in tiny Llama's shape (2 layers, 4 heads, 2 KV heads), not saved or loaded;
    Wanda leaves its weights as they were (asserted where it prunes)."""
    return memory_llama()


def data(n: int) -> list[Sample]:
    return builtin_calibration().utility[:n]


def assert_close_norms(fast, slow):
    assert fast.keys() == slow.keys()
    for name in fast:
        assert fast[name].dtype == torch.float32 and fast[name].device.type == "cpu"
        assert torch.allclose(fast[name].double(), slow[name], rtol=1e-4, atol=1e-6), name


def naive_sequential(loaded: LoadedModel, samples, cfg: WandaConfig) -> dict[str, torch.Tensor]:
    """Wanda's sequential mode the slow way: full forward passes, one more layer pruned each."""
    a = loaded.adapter

    def layer_masks(layer: int) -> dict:
        norms = naive_norms(loaded, samples, cfg.tokens)
        return {
            name: slow_row_mask(
                wanda_score(mod.weight, norms[name]), int(mod.weight.shape[1] * cfg.sparsity)
            )
            for name, l, _, mod in a.iter_linears()
            if l == layer
        }

    return pruned_layer_by_layer(loaded, layer_masks)


@pytest.mark.parametrize("tokens", ["response", "all"])
def test_norms_equal_one_sample_at_a_time(llama, tokens, monkeypatch):
    bars = Spy(monkeypatch, wanda, "bar")
    moved = Spy(monkeypatch, encoding.Batch, "to")
    samples = data(5)
    fast = wanda_norms(llama, samples, WandaConfig(tokens=tokens, batch_size=2))
    assert_close_norms(fast, naive_norms(llama, samples, tokens))
    assert len(fast) == 7 * 2
    assert [kw for _, kw in bars.calls] == [
        {"desc": "Wanda statistics", "total": 3, "unit": "batch"}
    ]
    assert [args[1] for args, _ in moved.calls] == [llama.device] * 3
    assert count_hooks(llama.model) == 0


def test_norms_skip_batches_without_selected_tokens(llama, monkeypatch):
    bars = Spy(monkeypatch, wanda, "bar")
    samples = data(4)
    mixed = [Sample(samples[0].prompt), samples[1], Sample(samples[2].prompt), samples[3]]
    fast = wanda_norms(llama, mixed, WandaConfig(batch_size=1), desc="calibrating")
    assert_close_norms(fast, naive_norms(llama, [samples[1], samples[3]], "response"))
    assert bars.calls[0][1]["desc"] == "calibrating"


def test_norms_without_any_selected_token_are_a_clear_error(llama):
    with pytest.raises(ValueError) as e:
        wanda_norms(llama, [Sample(s.prompt) for s in data(2)], WandaConfig())
    assert str(e.value) == (
        "no calibration tokens were selected: the samples have no responses; "
        "give answers or use tokens='all'"
    )


def test_norms_stop_when_asked(llama):
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 1

    with pytest.raises(Cancelled):
        wanda_norms(llama, data(4), WandaConfig(batch_size=1), should_stop=stop)
    assert len(asked) == 2 and count_hooks(llama.model) == 0


class TwoProcesses(World):
    """A scripted world of ``size`` processes, run one after another in this process: the
    other ranks' batches come from earlier runs (``sent``), the main one's answer too."""

    def __init__(self, rank: int, size: int, sent: dict[int, object], answer: list[object]):
        super().__init__(rank, size)
        self.sent, self.answer = sent, answer

    def gather(self, obj):
        self.sent[self.rank] = obj
        if not self.is_main:
            return None
        return [self.sent[r] for r in range(self.size)]

    def broadcast(self, obj):
        if self.is_main:
            self.answer.append(obj)
            return obj
        if not self.answer:
            raise LookupError("the main process has not answered yet")
        return self.answer[0]


def shared_run(loaded, samples, cfg, size, monkeypatch, **kw):
    """Every rank of a ``size``-process world; returns each rank's result (or error)."""
    sent: dict[int, object] = {}
    answer: list[object] = []
    results: dict[int, object] = {}
    for rank in [*range(1, size), 0, *range(1, size)]:  # the others, main, the others again
        w = TwoProcesses(rank, size, sent, answer)
        monkeypatch.setattr(wanda, "world", lambda w=w: w)
        try:
            results[rank] = wanda_norms(loaded, samples, cfg, **kw)
        except LookupError:
            continue
        except ValueError as e:
            results[rank] = e
    return results


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("tokens", ["response", "all"])
def test_shared_norms_equal_one_process_bit_for_bit(llama, monkeypatch, size, tokens):
    samples = data(7)
    cfg = WandaConfig(tokens=tokens, batch_size=2)
    one = wanda_norms(llama, samples, cfg)
    bars = Spy(monkeypatch, wanda, "bar")
    moved = Spy(monkeypatch, encoding.Batch, "to")
    results = shared_run(llama, samples, cfg, size, monkeypatch, desc="stats")
    assert {args[1] for args, _ in moved.calls} == {llama.device}
    assert sorted(results) == list(range(size))
    for rank, got in results.items():
        assert got.keys() == one.keys(), rank
        for name in one:
            assert torch.equal(got[name], one[name]), (rank, name)
    labels = {kw["desc"] for _, kw in bars.calls}
    assert labels == {f"stats ({r + 1}/{size})" for r in range(size)}
    assert {kw["unit"] for _, kw in bars.calls} == {"batch"}
    assert count_hooks(llama.model) == 0


def test_shared_norms_errors_reach_every_process(llama, monkeypatch):
    samples = [Sample(s.prompt) for s in data(3)]
    results = shared_run(llama, samples, WandaConfig(batch_size=1), 2, monkeypatch)
    assert sorted(results) == [0, 1]
    for err in results.values():
        assert isinstance(err, ValueError)
        assert str(err) == (
            "no calibration tokens were selected: the samples have no responses; "
            "give answers or use tokens='all'"
        )


def test_shared_norms_default_label_and_stop(llama, monkeypatch):
    bars = Spy(monkeypatch, wanda, "bar")
    w = TwoProcesses(1, 2, {}, [])
    monkeypatch.setattr(wanda, "world", lambda: w)
    with pytest.raises(LookupError):
        wanda_norms(llama, data(4), WandaConfig(batch_size=1))
    assert bars.calls[0][1]["desc"] == "Wanda statistics (2/2)"
    with pytest.raises(Cancelled):
        wanda_norms(llama, data(4), WandaConfig(batch_size=1), should_stop=lambda: True)
    assert count_hooks(llama.model) == 0


def test_prune_masks_equal_a_per_row_sort(llama):
    norms = wanda_norms(llama, data(4), WandaConfig())
    for cfg in (WandaConfig(sparsity=0.5), WandaConfig(sparsity=0.3)):
        masks = prune_masks(llama, norms, cfg)
        assert len(masks) == 14
        for name, _, _, mod in llama.adapter.iter_linears():
            k = int(mod.weight.shape[1] * cfg.sparsity)
            expected = slow_row_mask(wanda_score(mod.weight, norms[name]), k)
            assert torch.equal(masks[name].unpack(), expected), name
            assert masks[name].count == int(expected.sum())
    nm = prune_masks(llama, norms, WandaConfig(structure="n:m", n=2, m=4))
    name, _, _, mod = next(llama.adapter.iter_linears())
    assert torch.equal(nm[name].unpack(), slow_nm_mask(wanda_score(mod.weight, norms[name]), 2, 4))


def test_prune_masks_refuse_missing_or_broken_norms(llama):
    norms = {n: torch.ones(m.weight.shape[1]) for n, _, _, m in llama.adapter.iter_linears()}
    first = next(iter(norms))
    with pytest.raises(KeyError, match=f"no utility norms for {first}; were they computed"):
        prune_masks(llama, {k: v for k, v in norms.items() if k != first}, WandaConfig())
    broken = {**norms, first: norms[first].clone()}
    broken[first][2] = float("nan")
    with pytest.raises(ValueError, match=f"the Wanda statistics of {first} are not finite"):
        prune_masks(llama, broken, WandaConfig())


def test_sequential_masks_equal_full_passes_pruned_a_layer_at_a_time(llama, monkeypatch):
    samples = data(4)
    cfg = WandaConfig(sparsity=0.5, mode="sequential", batch_size=2)
    before = {n: m.weight.detach().clone() for n, _, _, m in llama.adapter.iter_linears()}
    bars = Spy(monkeypatch, wanda, "bar")
    moved = Spy(monkeypatch, encoding.Batch, "to")
    layers = Spy(monkeypatch, wanda, "run_layer")
    head_calls = []
    with HookSet() as hooks:
        hooks.post(llama.model.lm_head, lambda *_: head_calls.append(1))
        seq = compute_masks(llama, {}, samples, cfg)
    assert not head_calls  # the passes stop after the last decoder layer
    assert [kw for _, kw in bars.calls] == [{"desc": "Sequential Wanda", "unit": "layer"}]
    assert [args[1] for args, _ in moved.calls] == [llama.device] * 2
    assert {args[1].shape[0] for args, _ in layers.calls} == {2}  # batches of 2
    for n, _, _, m in llama.adapter.iter_linears():
        assert torch.equal(m.weight, before[n]), n
    slow = naive_sequential(llama, samples, cfg)
    assert seq.keys() == slow.keys()
    for name in slow:
        assert torch.equal(seq[name].unpack(), slow[name]), name
        assert seq[name].count == int(slow[name].sum())
    # layer 1 sees a pruned layer 0: not the one-shot masks
    one_cfg = WandaConfig(sparsity=0.5, batch_size=2)
    one_shot = compute_masks(llama, wanda_norms(llama, samples, one_cfg), samples, one_cfg)
    a = llama.adapter
    for p in ("q_proj", "down_proj"):  # layer 0 sees the dense inputs either way
        assert torch.equal(
            seq[a.linear_name(0, p)].unpack(), one_shot[a.linear_name(0, p)].unpack()
        )
    assert any(
        not torch.equal(seq[a.linear_name(1, p)].unpack(), one_shot[a.linear_name(1, p)].unpack())
        for p in ("q_proj", "o_proj", "gate_proj", "down_proj")
    )


def test_sequential_masks_stop_when_asked(llama):
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 1

    cfg = WandaConfig(mode="sequential")
    before = {n: m.weight.detach().clone() for n, _, _, m in llama.adapter.iter_linears()}
    with pytest.raises(Cancelled):
        compute_masks(llama, {}, data(2), cfg, should_stop=stop)
    assert len(asked) == 2
    for n, _, _, m in llama.adapter.iter_linears():
        assert torch.equal(m.weight, before[n]), n


def test_sequential_masks_refuse_non_finite_statistics(llama, monkeypatch):
    original = _NormCollector.norms

    def broken(self):
        out = original(self)
        out[next(iter(out))][0] = float("inf")
        return out

    monkeypatch.setattr(_NormCollector, "norms", broken)
    first = llama.adapter.linear_name(0, "q_proj")
    with pytest.raises(ValueError, match=f"^the Wanda statistics of {first} are not finite"):
        sequential_masks(llama, data(2), WandaConfig(mode="sequential"))


# ---------------------------------------------------------------------------------------------
# the tiny Llama-3.2-Vision: cross-attention k/v read the vision states


@pytest.mark.parametrize("tokens", ["response", "all"])
def test_vision_norms_equal_one_sample_at_a_time(tiny_mllama, tokens):
    samples = with_typographic_images(data(3))
    fast = wanda_norms(tiny_mllama, samples, WandaConfig(tokens=tokens, batch_size=2))
    assert_close_norms(fast, naive_norms(tiny_mllama, samples, tokens))


def test_vision_sequential_masks_equal_full_passes(tiny_mllama):
    samples = with_typographic_images(data(3))
    cfg = WandaConfig(sparsity=0.5, mode="sequential", batch_size=2)
    seq = sequential_masks(tiny_mllama, samples, cfg)
    slow = naive_sequential(tiny_mllama, samples, cfg)
    assert seq.keys() == slow.keys()
    for name in slow:
        assert torch.equal(seq[name].unpack(), slow[name]), name


def test_vision_layers_without_images_are_a_clear_error(tiny_mllama):
    for run in (wanda_norms, sequential_masks):
        with pytest.raises(ValueError, match="the cross-attention layers \\[2\\] never ran"):
            run(tiny_mllama, data(2), WandaConfig())


def test_vision_shared_norms_equal_one_process_bit_for_bit(tiny_mllama, monkeypatch):
    """Samples with and without an image (batches never mix them): the cross-attention k/v
    read the seen tiles' vision rows in every process."""
    pictured = with_typographic_images(data(3))
    samples = [pictured[0], *data(5)[3:], pictured[1], pictured[2]]
    cfg = WandaConfig(batch_size=2)
    one = wanda_norms(tiny_mllama, samples, cfg)
    assert_close_norms(one, naive_norms(tiny_mllama, samples, "response"))
    results = shared_run(tiny_mllama, samples, cfg, 2, monkeypatch)
    assert sorted(results) == [0, 1]
    for rank, got in results.items():
        assert got.keys() == one.keys(), rank
        for name in one:
            assert torch.equal(got[name], one[name]), (rank, name)


def test_vision_shared_norms_without_images_fail_alike_everywhere(tiny_mllama, monkeypatch):
    results = shared_run(tiny_mllama, data(3), WandaConfig(batch_size=2), 2, monkeypatch)
    assert sorted(results) == [0, 1]
    for err in results.values():
        assert isinstance(err, ValueError)
        assert str(err).startswith("the cross-attention layers [2] never ran")
