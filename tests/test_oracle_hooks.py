"""The temporary model changes of ``hsr_core.hooks`` against slices built by hand (issue 18).

Every reference here is this file's own: the ablated head's slice of ``o_proj``'s input is
zeroed, or replaced by a running mean written as a loop over positions, on values captured by
this file's hooks; recorded layer inputs are compared with inputs this file's hooks saw;
replays with the layer called directly. A tiny Llama built in memory (GQA: 4 heads, 2 KV
heads) and the tiny Llama-3.2-Vision (cross-attention at layer 2) are the models.
"""

from __future__ import annotations

import types

import pytest
import torch
from oracles import memory_llama
from torch import nn

# imported at the top: collecting the file loads the model code once for a mutation run
from transformers import LlamaForCausalLM, MllamaForConditionalGeneration  # noqa: F401

from hsr_core import hooks as hk
from hsr_core.data import Sample, builtin_calibration, with_typographic_images
from hsr_core.encoding import encode_one, iter_batches
from hsr_core.hooks import (
    HookSet,
    add_head_ablation,
    causal_running_mean,
    count_hooks,
    forward_decoder_only,
    head_ablation,
    record_layers,
    run_layer,
    uniform_cross_mean,
)
from hsr_core.models import LoadedModel


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return memory_llama()


def prompts(n: int) -> list[Sample]:
    return [Sample(s.prompt) for s in builtin_calibration().safety[:n]]


def inputs_of(loaded, n: int = 1, images: bool = False):
    samples = prompts(n)
    if images:
        samples = with_typographic_images(samples)
    if n == 1:
        return encode_one(loaded, samples[0], with_response=False)[0]
    (batch,) = iter_batches(loaded, samples, n, with_response=False)
    return batch.inputs


# ---------------------------------------------------------------------------------------------
# HookSet and count_hooks


def test_hookset_registers_and_removes_every_hook():
    lin = nn.Linear(2, 2)
    seen = []
    x = torch.ones(1, 2)
    with HookSet() as hooks:
        assert isinstance(hooks, HookSet)
        hooks.pre(lin, lambda m, args: seen.append("pre"))
        hooks.pre(lin, lambda m, args, kw: seen.append(("kw", sorted(kw))), with_kwargs=True)
        hooks.post(lin, lambda m, args, out: seen.append("post"))
        lin(x)
    assert seen == ["pre", ("kw", []), "post"]
    lin(x)
    assert len(seen) == 3 and not lin._forward_pre_hooks and not lin._forward_hooks
    assert hooks._handles == []


def test_hookset_removes_its_hooks_when_the_body_raises():
    lin = nn.Linear(2, 2)
    with pytest.raises(KeyError), HookSet() as hooks:
        hooks.pre(lin, lambda m, args: None)
        hooks.post(lin, lambda m, args, out: None)
        raise KeyError("boom")
    assert not lin._forward_pre_hooks and not lin._forward_hooks


def test_pre_hook_with_kwargs_sees_the_keyword_arguments():
    class Two(nn.Module):
        def forward(self, x, *, scale=1.0):
            return x * scale

    mod, got = Two(), {}
    with HookSet() as hooks:
        hooks.pre(mod, lambda m, args, kw: got.update(kw), with_kwargs=True)
        mod(torch.ones(1), scale=3.0)
    assert got == {"scale": 3.0}


def test_count_hooks_counts_only_this_projects_hooks(llama):
    a = llama.adapter
    model = llama.model
    assert count_hooks(model) == 0
    with HookSet() as hooks:
        hooks.pre(a.layers[0], lambda m, args: None)  # a test's hook: not the project's
        assert count_hooks(model) == 0
        with head_ablation(a, [(0, 1), (1, 2), (1, 3)], "uniform"):
            assert count_hooks(model) == 3 * 2  # per head: the ablation and the value grab
        with head_ablation(a, [(0, 1)]):
            assert count_hooks(model) == 1
        seen: dict = {}
        hooks.pre(a.final_norm, seen.__setitem__)  # a method-wrapper: it has no __module__
        assert count_hooks(model) == 0
    assert count_hooks(model) == 0


# ---------------------------------------------------------------------------------------------
# the running mean and the cross-attention mean, by loops


def loop_running_mean(values: torch.Tensor) -> torch.Tensor:
    out = torch.empty(values.shape, dtype=torch.float64)
    for t in range(values.shape[1]):
        out[:, t] = values[:, : t + 1].double().mean(dim=1)
    return out


def test_causal_running_mean_equals_a_loop():
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 1, 3), (2, 5, 4), (3, 7, 2, 4)]:
        v = torch.randn(shape, generator=g)
        got = causal_running_mean(v)
        assert got.dtype == torch.float32 and got.shape == v.shape
        assert torch.allclose(got.double(), loop_running_mean(v), atol=1e-6)
    on_meta = causal_running_mean(torch.empty(2, 5, 3, device="meta"))  # the counts follow
    assert on_meta.device.type == "meta" and on_meta.shape == (2, 5, 3)
    half = torch.tensor([[[256.0], [1.0], [2.0]]], dtype=torch.bfloat16)  # 257 not a bfloat16
    assert causal_running_mean(half).flatten().tolist() == pytest.approx([256, 128.5, 259 / 3])


def loop_cross_mean(values, allowed, rows, seq):
    """``allowed``: bool ``[batch or 1, seq, vision tokens]``; the mean over allowed tokens,
    0 where none is allowed."""
    out = torch.zeros(len(rows), seq, values.shape[-1], dtype=torch.float64)
    for i, r in enumerate(rows.tolist()):
        row = allowed[r] if allowed.shape[0] > 1 else allowed[0]
        for t in range(seq):
            seen = [values[i, j].double() for j in range(values.shape[1]) if row[t, j]]
            if seen:
                out[i, t] = torch.stack(seen).mean(dim=0)
    return out


def test_uniform_cross_mean_equals_a_loop():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(2, 5, 3, generator=g)  # rows 1 and 3 of a batch of 4
    rows = torch.tensor([1, 3])
    seq = 4
    allowed = torch.rand(4, seq, 5, generator=g) > 0.5
    allowed[1, 2] = False  # a query seeing nothing: 0
    allowed[3, 0] = True
    additive = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]
    for mask in (allowed[:, None], additive):
        got = uniform_cross_mean(values, mask, rows, seq)
        assert got.shape == (2, seq, 3)
        assert torch.allclose(got.double(), loop_cross_mean(values, allowed, rows, seq), atol=1e-6)
    assert uniform_cross_mean(values, additive, rows, seq)[0, 2].abs().sum() == 0
    two = allowed[:2]  # a mask of two rows: rows 1 and 0 of a batch of 2
    got = uniform_cross_mean(values, two[:, None], torch.tensor([1, 0]), seq)
    assert torch.allclose(
        got.double(), loop_cross_mean(values, two, torch.tensor([1, 0]), seq), atol=1e-6
    )
    one = allowed[:1]  # a mask of one row, shared by every row
    got = uniform_cross_mean(values, one[:, None], rows, seq)
    assert torch.allclose(got.double(), loop_cross_mean(values, one, rows, seq), atol=1e-6)
    every = uniform_cross_mean(values, None, rows, seq)
    assert every.shape == (2, seq, 3)
    for t in range(seq):
        assert torch.allclose(every[:, t], values.mean(dim=1))


# ---------------------------------------------------------------------------------------------
# head ablation at o_proj's input, against slices built by hand


def o_proj_inputs(loaded, layer, inputs, ablate=None):
    """``(o_proj's input, v_proj's output, the attention's kwargs)`` of ``layer`` in one
    forward pass, with ``ablate(hooks)`` adding the library's hooks first."""
    attn = loaded.adapter.attention(layer)
    got = {}
    with HookSet() as hooks, torch.no_grad():
        if ablate is not None:
            ablate(hooks)
        hooks.pre(attn, lambda m, args, kw: got.update(kw=kw), with_kwargs=True)
        hooks.post(attn.v_proj, lambda m, args, out: got.update(v=out.clone()))
        hooks.pre(attn.o_proj, lambda m, args: got.update(x=args[0].clone()))  # after ablation
        loaded.model(**inputs, use_cache=False)
    return got["x"], got["v"], got["kw"]


def expected_ablation(loaded, layer, x, v, kw, row_heads, mode):
    """The hand-built ablation of ``x`` ``[batch, seq, H * d_h]``: per row, its head's slice
    zeroed, or set to the running mean (self-attention) or the mask-limited mean
    (cross-attention) of its KV group's values."""
    a = loaded.adapter
    H, K, d = a.num_heads, a.num_kv_heads, a.head_dim
    cross = layer in a.cross_layers
    out = x.clone().double()
    b, seq = x.shape[:2]
    for r in range(b):
        h = int(row_heads[r])
        if h < 0:
            continue
        sl = slice(h * d, (h + 1) * d)
        g = h // (H // K)
        if mode == "zero":
            out[r, :, sl] = 0
        elif not cross:
            vg = v[r, :, g * d : (g + 1) * d].double()  # [seq, d]
            for t in range(seq):
                out[r, t, sl] = vg[: t + 1].mean(dim=0)
        else:
            vg = v.reshape(b, -1, K * d)[r, :, g * d : (g + 1) * d].double()  # [vision, d]
            mask = kw.get("attention_mask")
            for t in range(seq):
                if mask is None:
                    ok = torch.ones(vg.shape[0], dtype=torch.bool)
                else:
                    m = mask[r if mask.shape[0] > 1 else 0, 0, t]
                    ok = m if m.dtype == torch.bool else m == 0
                out[r, t, sl] = vg[ok].mean(dim=0) if ok.any() else 0
    return out


@pytest.mark.parametrize("mode", ["zero", "uniform"])
def test_one_head_per_row_equals_the_hand_built_slice(llama, mode):
    inputs = inputs_of(llama, 3)
    batch = inputs["input_ids"].shape[0]
    for layer, heads in [(0, [1, -1, 2]), (1, [3, 0, -1])]:
        row_heads = torch.tensor(heads)
        x0, v, kw = o_proj_inputs(llama, layer, inputs)
        x, _, _ = o_proj_inputs(
            llama,
            layer,
            inputs,
            lambda h, l=layer, r=row_heads: add_head_ablation(h, llama.adapter, l, r, mode),
        )
        want = expected_ablation(llama, layer, x0, v, kw, row_heads, mode)
        assert x.dtype == x0.dtype and torch.allclose(x.double(), want, atol=1e-5), layer
        assert batch == 3 and torch.equal(x[1 if layer == 0 else 2], x0[1 if layer == 0 else 2])


@pytest.mark.parametrize("mode", ["zero", "uniform"])
def test_an_int_or_a_callable_names_the_heads(llama, mode):
    inputs = inputs_of(llama, 2)
    x0, v, kw = o_proj_inputs(llama, 1, inputs)
    want = expected_ablation(llama, 1, x0, v, kw, torch.tensor([2, 2]), mode)
    for spec in (2, lambda: torch.tensor([2, 2])):
        x, _, _ = o_proj_inputs(
            llama, 1, inputs, lambda h, s=spec: add_head_ablation(h, llama.adapter, 1, s, mode)
        )
        assert torch.allclose(x.double(), want, atol=1e-5)
    none, _, _ = o_proj_inputs(
        llama,
        1,
        inputs,
        lambda h: add_head_ablation(h, llama.adapter, 1, torch.tensor([-1, -1]), mode),
    )
    assert torch.equal(none, x0)


def test_the_default_mode_is_zero(llama):
    inputs = inputs_of(llama)
    x0, v, kw = o_proj_inputs(llama, 0, inputs)
    x, _, _ = o_proj_inputs(llama, 0, inputs, lambda h: add_head_ablation(h, llama.adapter, 0, 3))
    assert torch.equal(x.double(), expected_ablation(llama, 0, x0, v, kw, [3], "zero"))


def test_ablation_errors(llama):
    inputs = inputs_of(llama, 2)
    with pytest.raises(RuntimeError, match=r"^head ablation got 3 rows for a batch of 2$"):
        o_proj_inputs(
            llama,
            0,
            inputs,
            lambda h: add_head_ablation(h, llama.adapter, 0, torch.tensor([0, 1, 2])),
        )
    with pytest.raises(ValueError, match=r"^unknown ablation mode 'half'$"):
        o_proj_inputs(llama, 0, inputs, lambda h: add_head_ablation(h, llama.adapter, 0, 1, "half"))
    assert count_hooks(llama.model) == 0


def test_a_bfloat16_layer_keeps_its_dtype(llama):
    a = llama.adapter
    attn = a.attention(0)
    got = {}
    x = torch.randn(2, 3, a.num_heads * a.head_dim).to(torch.bfloat16)
    v = torch.randn(2, 3, a.num_kv_heads * a.head_dim).to(torch.bfloat16)
    for mode in ("zero", "uniform"):
        with HookSet() as hooks:
            add_head_ablation(hooks, a, 0, torch.tensor([1, -1]), mode)
            hooks.pre(attn.o_proj, lambda m, args: got.update(x=args[0]))
            attn.o_proj.to(torch.bfloat16)
            try:
                for fn in attn.v_proj._forward_hooks.values():
                    fn(attn.v_proj, (None,), v)
                attn.o_proj(x)
            finally:
                attn.o_proj.float()
        assert got["x"].dtype == torch.bfloat16
        want = expected_ablation(llama, 0, x, v, {}, [1, -1], mode)
        assert torch.allclose(got["x"].double(), want, atol=2e-2), mode


def test_head_ablation_ablates_every_pair_in_every_row(llama):
    inputs = inputs_of(llama, 2)
    a = llama.adapter
    d = a.head_dim
    for mode in ("zero", "uniform"):
        pairs = [(0, 0), (1, 3), (1, 1), (0, 2)]
        got = {}
        with head_ablation(a, pairs, mode), HookSet() as hooks, torch.no_grad():
            for layer in (0, 1):
                o = a.attention(layer).o_proj
                hooks.pre(
                    o, lambda m, args, layer=layer, got=got: got.update({layer: args[0].clone()})
                )
            llama.model(**inputs, use_cache=False)
        assert count_hooks(llama.model) == 0
        for layer, heads in [(0, [0, 2]), (1, [3, 1])]:
            for h in range(a.num_heads):
                part = got[layer][..., h * d : (h + 1) * d]
                if mode == "zero":
                    assert (part == 0).all() == (h in heads), (layer, h)
    assert not llama.model._forward_hooks


def test_uniform_ablation_of_one_head_equals_the_loop_in_a_full_pass(llama):
    """Several heads of one layer at once: each hook sees the values of its own layer."""
    inputs = inputs_of(llama)
    x0, v, kw = o_proj_inputs(llama, 1, inputs)

    def both(h):
        add_head_ablation(h, llama.adapter, 1, 0, "uniform")
        add_head_ablation(h, llama.adapter, 1, 3, "uniform")

    x, _, _ = o_proj_inputs(llama, 1, inputs, both)
    once = expected_ablation(llama, 1, x0, v, kw, [0], "uniform")
    want = expected_ablation(llama, 1, once.float(), v, kw, [3], "uniform")
    assert torch.allclose(x.double(), want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the cross-attention layer of Llama-3.2-Vision


@pytest.mark.parametrize("mode", ["zero", "uniform"])
def test_cross_attention_head_ablation_equals_the_hand_built_slice(tiny_mllama, mode):
    loaded = tiny_mllama
    layer = 2
    assert loaded.adapter.layer_kind(layer) == "cross"
    inputs = inputs_of(loaded, 3, images=True)
    row_heads = torch.tensor([-1, 1, 2])  # the first row left alone
    x0, v, kw = o_proj_inputs(loaded, layer, inputs)
    assert kw.get("attention_mask") is not None
    x, _, _ = o_proj_inputs(
        loaded,
        layer,
        inputs,
        lambda h: add_head_ablation(h, loaded.adapter, layer, row_heads, mode),
    )
    want = expected_ablation(loaded, layer, x0, v, kw, row_heads, mode)
    assert torch.allclose(x.double(), want, atol=1e-5)
    assert count_hooks(loaded.model) == 0


# ---------------------------------------------------------------------------------------------
# record_layers, forward_decoder_only, run_layer


def seen_by_layers(loaded, inputs):
    """Each decoder layer's input and kwargs, the final norm's output, the model's kwargs."""
    a = loaded.adapter
    got: dict = {"h": {}, "kw": {}}
    with HookSet() as hooks, torch.no_grad():

        def grab(i):
            def fn(m, args, kw):
                got["h"][i] = (args[0] if args else kw["hidden_states"]).clone()
                got["kw"][i] = kw

            return fn

        for i, layer in enumerate(a.layers):
            hooks.pre(layer, grab(i), with_kwargs=True)
        hooks.post(a.final_norm, lambda m, args, out: got.update(final=out.clone()))
        loaded.model(**inputs, use_cache=False)
    return got


def model_calls(loaded):
    """A spy on the model's forward kwargs and on the LM head's input shapes."""
    calls = {"kw": [], "head": []}
    hs = HookSet()
    hs.pre(loaded.model, lambda m, args, kw: calls["kw"].append(dict(kw)), with_kwargs=True)
    hs.pre(loaded.adapter.lm_head, lambda m, args: calls["head"].append(tuple(args[0].shape)))
    return hs, calls


def test_record_layers_equals_what_the_layers_saw(llama):
    inputs = inputs_of(llama, 2)
    ref = seen_by_layers(llama, inputs)
    spy, calls = model_calls(llama)
    with spy:
        rec = record_layers(llama.model, llama.adapter, inputs)
    assert len(rec.inputs) == 2 and rec.skipped == frozenset()
    for i in range(2):
        assert torch.equal(rec.inputs[i], ref["h"][i]), i
        assert set(rec.kwargs[i]) == set(ref["kw"][i]) - {"past_key_values", "past_key_value"}
    assert torch.equal(rec.final, ref["final"])
    assert calls["kw"][0]["use_cache"] is False and calls["kw"][0]["logits_to_keep"] == 1
    assert calls["head"] == [(2, 1, llama.adapter.hidden_size)]  # one position's logits
    assert count_hooks(llama.model) == 0


def test_record_layers_first_input_only_and_no_final_norm(llama):
    inputs = inputs_of(llama)
    ref = seen_by_layers(llama, inputs)
    spy, calls = model_calls(llama)
    with spy:
        rec = record_layers(llama.model, llama.adapter, inputs, every_input=False, final=False)
    assert len(rec.inputs) == 1 and torch.equal(rec.inputs[0], ref["h"][0])
    assert rec.final is None and calls["head"] == []
    assert calls["kw"][0]["use_cache"] is False
    assert all(k is not None for k in rec.kwargs) and len(rec.kwargs) == 2
    only_first = record_layers(llama.model, llama.adapter, inputs, every_input=False)
    assert len(only_first.inputs) == 1 and torch.equal(only_first.final, ref["final"])


def test_record_layers_leaves_out_the_cache():
    class Layer(nn.Module):
        def forward(self, hidden_states, **kw):
            return hidden_states

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer(), Layer()])
            self.norm = nn.Identity()

        def forward(self, x, use_cache=False):
            h = self.layers[0](x, past_key_values=1, past_key_value=2, cache=3, extra=4)
            h = self.layers[1](hidden_states=h, position_ids=5)
            return self.norm(h)

    model = Model()
    adapter = types.SimpleNamespace(
        num_layers=2, layers=model.layers, final_norm=model.norm, layer_kind=lambda i: "self"
    )
    x = torch.ones(1, 2, 3)
    rec = record_layers(model, adapter, {"x": x})
    assert rec.kwargs == [{"extra": 4}, {"position_ids": 5}]
    assert torch.equal(rec.inputs[1], x) and torch.equal(rec.final, x)


def test_forward_kwargs_ask_one_position_where_the_model_can():
    class With(nn.Module):
        def forward(self, x, logits_to_keep=0):
            return x

    class Without(nn.Module):
        def forward(self, x):
            return x

    assert hk._forward_kwargs(With()) == {"use_cache": False, "logits_to_keep": 1}
    assert hk._forward_kwargs(Without()) == {"use_cache": False}


def test_record_layers_errors(llama):
    a = llama.adapter
    inputs = inputs_of(llama)
    unused = nn.Identity()
    fake = types.SimpleNamespace(
        num_layers=3,
        layers=[unused, *a.layers],
        final_norm=a.final_norm,
        layer_kind=lambda i: "cross" if i == 0 else "self",
    )
    with pytest.raises(RuntimeError, match=r"^the intact forward pass skipped decoder layer 0$"):
        record_layers(llama.model, fake, inputs, every_input=False)
    rec = record_layers(llama.model, fake, inputs)  # every input kept: layer 0 may be skipped
    assert rec.skipped == {0} and rec.inputs[0] is None and rec.kwargs[0] is None
    fake.layer_kind = lambda i: "self"
    with pytest.raises(RuntimeError, match=r"^the intact forward pass did not run every decoder"):
        record_layers(llama.model, fake, inputs)
    fake = types.SimpleNamespace(
        num_layers=2, layers=a.layers, final_norm=unused, layer_kind=lambda i: "self"
    )
    with pytest.raises(RuntimeError, match=r"^the intact forward pass did not run the final norm$"):
        record_layers(llama.model, fake, inputs)
    assert record_layers(llama.model, fake, inputs, final=False).final is None
    assert count_hooks(llama.model) == 0


def test_record_layers_of_a_vision_model(tiny_mllama):
    loaded = tiny_mllama
    a = loaded.adapter
    inputs = inputs_of(loaded, 2, images=True)
    ref = seen_by_layers(loaded, inputs)
    rec = record_layers(loaded.model, a, inputs)
    assert rec.skipped == frozenset()
    states = ref["kw"][2]["cross_attention_states"]
    stored = rec.kwargs[2]["cross_attention_states"]
    assert stored.shape == (2, states.numel() // (2 * a.hidden_size), a.hidden_size)
    assert torch.equal(stored.reshape(states.shape), states)
    for i in range(a.num_layers):
        assert torch.equal(rec.inputs[i], ref["h"][i]), i
    text = record_layers(loaded.model, a, inputs_of(loaded, 1))  # no image: layer 2 skipped
    assert text.skipped == {2} and text.inputs[2] is None and text.kwargs[2] is None
    assert text.final is not None


def test_forward_decoder_only_runs_the_layers_and_stops(llama, tiny_mllama):
    for loaded in (llama, tiny_mllama):
        a = loaded.adapter
        inputs = inputs_of(loaded)
        ran = []
        spy, calls = model_calls(loaded)
        with spy, HookSet() as hooks:
            for i, layer in enumerate(a.layers):
                hooks.post(layer, lambda m, args, out, i=i, ran=ran: ran.append(i))
            hooks.post(a.final_norm, lambda *_, ran=ran: ran.append("norm"))
            forward_decoder_only(loaded.model, a, inputs)
        expected = [i for i in range(a.num_layers) if a.layer_kind(i) != "cross"]
        assert ran == expected and calls["head"] == []
        assert calls["kw"][0]["use_cache"] is False
        assert count_hooks(loaded.model) == 0 and not a.layers[-1]._forward_hooks
        assert not a.final_norm._forward_pre_hooks


def test_forward_decoder_only_stops_at_the_norm_when_the_last_layer_is_skipped():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Identity(), nn.Identity()])
            self.norm = nn.Identity()
            self.after = []

        def forward(self, x, use_cache=True):
            self.after.append(use_cache)
            x = self.layers[0](x)  # layer 1 skipped
            x = self.norm(x)
            self.after.append("past the norm")
            return x

    model = Model()
    adapter = types.SimpleNamespace(layers=model.layers, final_norm=model.norm)
    forward_decoder_only(model, adapter, {"x": torch.ones(1)})
    assert model.after == [False]
    assert not model.norm._forward_pre_hooks and not model.layers[1]._forward_hooks


def test_run_layer_replays_a_record_and_broadcasts_it(llama, tiny_mllama):
    inputs = inputs_of(llama)
    rec = record_layers(llama.model, llama.adapter, inputs)
    layer = llama.adapter.layers[1]
    with torch.no_grad():
        direct = layer(rec.inputs[1], **rec.kwargs[1])
        direct = direct[0] if isinstance(direct, tuple) else direct
        assert torch.equal(run_layer(layer, rec.inputs[1], rec.kwargs[1]), direct)
        three = run_layer(layer, rec.inputs[1].expand(3, -1, -1), rec.kwargs[1])
    assert three.shape[0] == 3
    for r in range(3):
        assert torch.allclose(three[r], direct[0], atol=1e-6)
    assert run_layer(lambda h, **kw: (h + 1, "rest"), torch.zeros(1), {}).tolist() == [1.0]
    assert run_layer(lambda h, **kw: h + 2, torch.zeros(1), {}).tolist() == [2.0]

    a = tiny_mllama.adapter
    vis = record_layers(tiny_mllama.model, a, inputs_of(tiny_mllama, 1, images=True))
    cross = a.layers[2]
    with torch.no_grad():
        one = run_layer(cross, vis.inputs[2], vis.kwargs[2])
        two = run_layer(cross, vis.inputs[2].expand(2, -1, -1), vis.kwargs[2])
    assert vis.kwargs[2]["cross_attention_states"].shape[0] == 1
    for r in range(2):
        assert torch.allclose(two[r], one[0], atol=1e-6)
    pair = record_layers(tiny_mllama.model, a, inputs_of(tiny_mllama, 2, images=True))
    assert pair.kwargs[2]["cross_attention_states"].shape[0] == 2
    with torch.no_grad():  # as many rows as recorded: replayed as they are
        again = run_layer(cross, pair.inputs[2], pair.kwargs[2])
        direct = cross(pair.inputs[2], **pair.kwargs[2])
    direct = direct[0] if isinstance(direct, tuple) else direct
    assert torch.equal(again, direct)
    bad = {
        **vis.kwargs[2],
        "cross_attention_states": vis.kwargs[2]["cross_attention_states"].expand(2, -1, -1),
    }
    with pytest.raises(
        ValueError, match=r"^vision states recorded for 2 rows cannot be replayed with 3$"
    ):
        run_layer(cross, vis.inputs[2].expand(3, -1, -1), bad)


def test_cross_attention_uniform_ablation_without_a_mask(tiny_mllama):
    """A cross-attention layer replayed without its mask: every query sees every vision
    token, and the ablated head's slice is their values' mean."""
    loaded = tiny_mllama
    a = loaded.adapter
    rec = record_layers(loaded.model, a, inputs_of(loaded, 2, images=True))
    kwargs = {**rec.kwargs[2], "cross_attention_mask": None}
    attn = a.attention(2)

    def replay(ablate=None):
        got = {}
        with HookSet() as hooks, torch.no_grad():
            if ablate is not None:
                add_head_ablation(hooks, a, 2, ablate, "uniform")
            hooks.pre(attn, lambda m, args, kw: got.update(kw=kw), with_kwargs=True)
            hooks.post(attn.v_proj, lambda m, args, out: got.update(v=out.clone()))
            hooks.pre(attn.o_proj, lambda m, args: got.update(x=args[0].clone()))
            run_layer(a.layers[2], rec.inputs[2], kwargs)
        return got

    intact = replay()
    assert intact["kw"].get("attention_mask") is None
    heads = torch.tensor([1, -1])
    x = replay(heads)["x"]
    want = expected_ablation(loaded, 2, intact["x"], intact["v"], intact["kw"], heads, "uniform")
    assert torch.allclose(x.double(), want, atol=1e-5)
