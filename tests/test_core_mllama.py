"""Llama-3.2-Vision (``MllamaForConditionalGeneration``, ``builtin:tiny-mllama``): the adapter
maps its self- and cross-attention layers; Ships scores, Wanda prunes and HSR restores in both
kinds; the whole pipeline runs with an image.

The any-architecture tests (``any_tiny``'s ``mllama``) already hold the batched Ships replay to
the naive loop, the Wanda statistics to a slow reference and the restore set to brute force on
this model; here is what only Mllama has: cross-attention layers, which read the image's vision
states and which Mllama skips for inputs without an image.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_core_ships import naive_final, naive_scores
from test_core_wanda import naive_sequential

from hsr_core import pipeline as pl
from hsr_core.builtin import TINY_MLLAMA_CROSS_LAYERS
from hsr_core.config import (
    EvalConfig,
    ModelSpec,
    RealignConfig,
    RunConfig,
    ShipsConfig,
    WandaConfig,
)
from hsr_core.data import Sample, builtin_calibration, builtin_eval, with_typographic_images
from hsr_core.encoding import collate, encode_one, iter_batches
from hsr_core.evaluate import generate
from hsr_core.heads import all_heads, top_heads
from hsr_core.hooks import HookSet, count_hooks, record_layers
from hsr_core.models import check_supported
from hsr_core.ships import ablated_finals, ships_scores
from hsr_core.store import ResultCache
from hsr_core.variants import Variants
from hsr_core.wanda import prune_masks, sequential_masks, vision_tiles, wanda_norms

CROSS = TINY_MLLAMA_CROSS_LAYERS[0]


def harmful(n: int, images: bool = True) -> list[Sample]:
    prompts = [Sample(s.prompt) for s in builtin_calibration().safety[:n]]
    return with_typographic_images(prompts) if images else prompts


def test_adapter_maps_both_kinds(tiny_mllama):
    a = tiny_mllama.adapter
    assert type(tiny_mllama.model).__name__ == "MllamaForConditionalGeneration"
    assert a.layer_kinds() == ["self", "self", "cross", "self"]
    assert a.cross_layers == frozenset(tiny_mllama.model.config.text_config.cross_attention_layers)
    assert (a.num_layers, a.num_heads, a.num_kv_heads, a.head_dim) == (4, 4, 2, 16)
    assert type(a.attention(CROSS)).__name__ == "MllamaTextCrossAttention"
    assert type(a.attention(0)).__name__ == "MllamaTextSelfAttention"
    name = a.linear_name(CROSS, "k_proj")
    assert name == f"model.language_model.layers.{CROSS}.cross_attn.k_proj"
    assert a.parse(name) == (CROSS, "k_proj")
    assert tiny_mllama.model.get_submodule(name) is a.linear(CROSS, "k_proj")
    # every decoder linear of both kinds, and nothing of the vision tower or the projector
    decoder = {n for n, m in a.layers.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n.removeprefix(a.layers_path + ".") for n in a.linear_names()} == decoder
    assert tiny_mllama.describe()["cross_attention_layers"] == [CROSS]
    run = RunConfig(model=ModelSpec("builtin:tiny-mllama"))
    assert pl.summary(tiny_mllama, run, None, None, {}, {})["cross_attention_layers"] == [CROSS]
    check_supported(tiny_mllama.path)  # from the config alone, on the meta device
    with pytest.raises(IndexError):
        a.layer_kind(a.num_layers)


def test_answers_see_the_image_and_padding_does_not(tiny_mllama):
    """The answer tokens appended to a prompt get the prompt's last row of the cross-attention
    mask (as Mllama's generate extends it); padding, left or right, sees no image."""
    s = with_typographic_images(builtin_calibration().utility[:1])[0]
    inputs, plen, rlen = encode_one(tiny_mllama, s)
    cam = inputs["cross_attention_mask"]  # [1, seq, images, tiles]
    assert rlen > 0 and cam.shape[1] == inputs["input_ids"].shape[1] == plen + rlen
    assert torch.equal(cam[0, plen:], cam[0, plen - 1 : plen].expand(rlen, -1, -1))
    assert cam[0, -1].sum() == 1  # one real tile of two: the square image leaves a padding one
    short = encode_one(tiny_mllama, Sample("Hi", image_text="Hi"), with_response=False)
    for side in ("left", "right"):
        b = collate([(inputs, plen, rlen), short], tiny_mllama.tokenizer.pad_token_id, side=side)
        got = b.inputs["cross_attention_mask"][1]
        n = short[0]["input_ids"].shape[1]
        real = slice(-n, None) if side == "left" else slice(0, n)
        pad = slice(0, -n) if side == "left" else slice(n, None)
        assert torch.equal(got[real], short[0]["cross_attention_mask"][0])
        assert got[pad].sum() == 0 and got[real].sum() > 0


def test_cross_heads_change_the_output_only_with_an_image(tiny_mllama):
    a = tiny_mllama.adapter
    with_image, text_only = harmful(1)[0], harmful(1, images=False)[0]
    rec = record_layers(
        tiny_mllama.model, a, encode_one(tiny_mllama, with_image, with_response=False)[0]
    )
    assert rec.skipped == frozenset()
    heads = [(CROSS, h) for h in range(a.num_heads)]
    fast = ablated_finals(tiny_mllama, rec, heads, batch_size=3)
    assert ((fast - rec.final[0, -1]).abs().amax(dim=1) > 0).all()
    text = encode_one(tiny_mllama, text_only, with_response=False)[0]
    rec = record_layers(tiny_mllama.model, a, text)
    assert rec.skipped == {CROSS} and rec.kwargs[CROSS] is None and rec.inputs[CROSS] is None
    every = all_heads(a.num_layers, a.num_heads)
    fast = ablated_finals(tiny_mllama, rec, every, batch_size=3)
    slow = torch.stack([naive_final(tiny_mllama, text_only, [hd]) for hd in every])
    assert torch.allclose(fast.float(), slow, atol=1e-5, rtol=1e-4)
    for i, (l, _) in enumerate(every):  # the skipped layer's heads: exactly the intact state
        assert torch.equal(fast[i], rec.final[0, -1]) == (l == CROSS)


def test_uniform_cross_ablation_matches_query_scaling(tiny_mllama):
    """Uniform attention of a cross-attention head is its attention with the query scaled to
    ~0: the query after ``q_norm`` (which would undo a scaling of ``q_proj``'s output), so the
    head looks evenly at the vision tokens the mask lets it see."""
    a = tiny_mllama.adapter
    sample = harmful(1)[0]
    inputs, _, _ = encode_one(tiny_mllama, sample, with_response=False)
    for h in (0, 3):

        def scale(_m, _i, out, h=h):  # [batch, heads, seq, head_dim]
            out = out.clone()
            out[:, h] *= 1e-7
            return out

        with HookSet() as hooks, torch.inference_mode():
            hooks.post(a.attention(CROSS).q_norm, scale)
            ref = tiny_mllama.model(**inputs, output_hidden_states=True).hidden_states[-1][0, -1]
        uniform = naive_final(tiny_mllama, sample, [(CROSS, h)], "uniform")
        zero = naive_final(tiny_mllama, sample, [(CROSS, h)], "zero")
        assert torch.allclose(uniform, ref, atol=1e-5)
        assert not torch.allclose(zero, ref, atol=1e-4)
    assert count_hooks(tiny_mllama.model) == 0


def test_text_only_probes_score_cross_heads_zero(tiny_mllama):
    a = tiny_mllama.adapter
    probes = harmful(3, images=False)
    with pytest.warns(UserWarning, match=rf"cross-attention layers \[{CROSS}\] never ran"):
        scores = ships_scores(tiny_mllama, probes, ShipsConfig(num_samples=3, batch_size=5))
    assert (scores[CROSS] == 0).all()
    self_layers = [l for l in range(a.num_layers) if l != CROSS]
    assert (scores[self_layers] > 0).all()
    slow = naive_scores(tiny_mllama, probes)
    assert torch.allclose(scores[self_layers], slow[self_layers], atol=1e-3)
    assert slow[CROSS].abs().max() < 1e-3  # the naive loop agrees, up to rounding
    with warnings.catch_warnings():  # with images, no warning and every head scores
        warnings.simplefilter("error")
        scores = ships_scores(tiny_mllama, harmful(3), ShipsConfig(num_samples=3))
    assert (scores > 0).all()


def test_wanda_needs_images_for_cross_layers(tiny_mllama):
    text_only = builtin_calibration().utility[:3]
    for cfg in (WandaConfig(), WandaConfig(mode="sequential", sparsity=0.5)):
        with pytest.raises(ValueError, match=rf"cross-attention layers \[{CROSS}\] never ran"):
            if cfg.mode == "sequential":
                sequential_masks(tiny_mllama, text_only, cfg)
            else:
                wanda_norms(tiny_mllama, text_only, cfg)


def test_cross_kv_statistics_leave_out_padding_tiles(tiny_mllama):
    """k/v of a cross-attention layer read the vision states: their norms count the patches
    of the tiles the text sees (one of the two tiles of a square image), whatever the token
    selection of the text linears."""
    a = tiny_mllama.adapter
    data = with_typographic_images(builtin_calibration().utility[:2])
    batch = next(iter_batches(tiny_mllama, data, 2))
    tiles = vision_tiles(batch.inputs)
    assert tiles.shape == (2, 1, 2) and tiles.sum() == 2  # [batch, images, tiles]
    seen = {}
    with HookSet() as hooks, torch.inference_mode():
        hooks.pre(a.linear(CROSS, "k_proj"), lambda _m, args: seen.setdefault("x", args[0]))
        tiny_mllama.model(**batch.inputs)
    states = seen["x"]  # [batch * images * tiles, patches, hidden]
    expected = torch.linalg.vector_norm(states[tiles.reshape(-1)].reshape(-1, 64), dim=0)
    everything = torch.linalg.vector_norm(states.reshape(-1, 64), dim=0)
    for tokens in ("response", "all"):
        norms = wanda_norms(tiny_mllama, data, WandaConfig(tokens=tokens, batch_size=2))
        for proj in ("k_proj", "v_proj"):
            got = norms[a.linear_name(CROSS, proj)]
            assert torch.allclose(got, expected, rtol=1e-5)
            assert not torch.allclose(got, everything, rtol=1e-3)


def test_sequential_wanda_equals_naive(tiny_mllama):
    data = with_typographic_images(builtin_calibration().utility[:4])
    cfg = WandaConfig(sparsity=0.5, mode="sequential", batch_size=2)
    before = {n: m.weight.detach().clone() for n, _, _, m in tiny_mllama.adapter.iter_linears()}
    seq = sequential_masks(tiny_mllama, data, cfg)
    for n, _, _, m in tiny_mllama.adapter.iter_linears():
        assert torch.equal(m.weight, before[n])
    slow = naive_sequential(tiny_mllama, data, cfg)
    assert seq.keys() == slow.keys()
    for name in slow:
        assert torch.equal(seq[name].unpack(), slow[name]), name


def test_batched_generation_with_images_equals_one_by_one(tiny_mllama):
    samples = with_typographic_images(
        [Sample("Hi"), Sample("Tell me a long story about a dragon and a castle."), Sample("2+2?")]
    )
    cfg = EvalConfig(max_new_tokens=6, batch_size=3)
    batched = generate(tiny_mllama, samples, cfg)
    single = [
        generate(tiny_mllama, [s], EvalConfig(max_new_tokens=6, batch_size=1))[0] for s in samples
    ]
    assert batched == single


def test_whole_pipeline_with_an_image(tiny_mllama, tmp_path):
    """Calibrate -> Ships (both kinds score) -> prune (both kinds) -> realign (a selected cross
    head gets weights back in the cross-attention layer) -> evaluate with images."""
    loaded, a = tiny_mllama, tiny_mllama.adapter
    calib = builtin_calibration()
    calib.safety, calib.utility = calib.safety[:6], calib.utility[:6]
    cache = ResultCache(tmp_path / "cache")
    wcfg = WandaConfig(num_samples=4, sparsity=0.5)
    safety, utility = pl.calibration_samples(loaded, calib, wcfg)
    assert all(s.has_image for s in safety + utility)  # the pipeline gives the images
    norms = pl.calibrate(loaded, safety, utility, wcfg, cache).value
    for n in (a.linear_name(CROSS, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        assert (norms.utility[n] > 0).all() and (norms.safety[n] > 0).all()
    scfg = ShipsConfig(num_samples=3)
    probes = pl.probe_prompts(loaded, calib, scfg)
    assert all(p.has_image for p in probes)
    scores = pl.attribute(loaded, probes, scfg, cache).value
    assert scores.shape == (4, 4) and (scores[CROSS] > 0).all() and (scores[0] > 0).all()
    masks = pl.prune(loaded, norms, utility, wcfg).value.masks
    report = pl.sparsity_report(loaded, masks)
    assert report["per_layer"][CROSS] == pytest.approx(0.5) and report["sparsity"] == 0.5
    assert torch.equal(
        masks[a.linear_name(CROSS, "k_proj")].unpack(),
        prune_masks(loaded, norms.utility, wcfg)[a.linear_name(CROSS, "k_proj")].unpack(),
    )
    v = Variants(loaded, scratch=tmp_path / "scratch")
    v.install(masks)
    ranking = top_heads(scores, a.num_layers * a.num_heads)
    top_h = 1 + next(i for i, h in enumerate(ranking) if h.layer == CROSS)
    rcfg = RealignConfig(top_h=top_h, p=0.2, q=0.8, max_p=0.9)
    rs = pl.realign(loaded, masks, scores, rcfg, pl.rank_cache(v, norms)).value
    cross_heads = [h for h in rs.heads if h.layer == CROSS]
    assert cross_heads and rs.heads[-1].layer == CROSS
    cross_names = {a.linear_name(CROSS, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert cross_names & rs.indices.keys()
    assert sum(rs.restored_in(h) for h in cross_heads) > 0
    v.install(masks, rs)
    dense = {n: loaded.model.get_submodule(n).weight.detach().clone() for n in cross_names}
    with v.use("realigned"):
        for n in cross_names & rs.indices.keys():
            w = loaded.model.get_submodule(n).weight.reshape(-1)
            assert torch.equal(w[rs.indices[n]], dense[n].reshape(-1)[rs.indices[n]])
    ev = [s for s in builtin_eval() if s.harmful][:2] + [
        s for s in builtin_eval() if not s.harmful
    ][:2]
    out = pl.evaluate(v, ev, EvalConfig(max_new_tokens=5, batch_size=4))
    assert set(out["variants"]) == {"original", "pruned", "realigned"}
    for res in out["variants"].values():
        assert len(res["answers"]) == 4
    assert out["variants"]["original"]["perplexity"] != out["variants"]["pruned"]["perplexity"]
    assert v.current == "original" and count_hooks(loaded.model) == 0
    v.close()
