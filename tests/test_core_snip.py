"""SNIP and magnitude against slow, obvious references: autograd by hand, finite differences,
and sorts (hsr_core/snip.py, hsr_core/magnitude.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hsr_core.config import WandaConfig
from hsr_core.data import Sample, builtin_calibration, with_typographic_images
from hsr_core.encoding import encode_one
from hsr_core.hooks import count_hooks
from hsr_core.magnitude import magnitude_masks
from hsr_core.masks import apply_mask
from hsr_core.models import LoadedModel, build_adapter
from hsr_core.progress import Cancelled
from hsr_core.snip import snip_masks, snip_scores


def samples(loaded, n: int = 3) -> list[Sample]:
    data = builtin_calibration().utility[:n]
    return with_typographic_images(data) if loaded.is_vision else data


def hand_loss(loaded, sample: Sample, tokens: str = "response") -> torch.Tensor:
    """One sample's LM loss from the model's full logits: the mean cross-entropy of the chosen
    tokens, each predicted from the position before it; checked against transformers' own loss
    with ``labels`` set to -100 elsewhere (the reference's ``model(input_ids, labels=tar)``)."""
    inputs, plen, rlen = encode_one(loaded, sample)
    ids = inputs["input_ids"][0]
    keep = torch.zeros(ids.shape[0], dtype=torch.bool)
    if tokens == "response":
        keep[plen : plen + rlen] = True
    else:
        keep[1:] = True
        image_id = getattr(loaded.model.config, "image_token_id", None)
        if image_id is not None:
            keep &= ids != image_id
    pos = keep.nonzero().squeeze(1)
    logits = loaded.model(**inputs, use_cache=False).logits[0]  # [seq, vocab]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(logits[pos - 1], ids[pos])
    labels = torch.where(keep, ids, torch.full_like(ids, -100))[None]
    hf = loaded.model(**inputs, labels=labels, use_cache=False).loss
    assert torch.allclose(loss, hf.to(loss.dtype), rtol=1e-5), (loss, hf)
    return loss


def hand_scores(loaded, data, names, tokens: str = "response") -> dict[str, torch.Tensor]:
    """``sum_s |W ⊙ ∂L_s/∂W|``: one backward per sample by ``torch.autograd.grad``."""
    mods = dict((n, m) for n, _, _, m in loaded.adapter.iter_linears())
    weights = [mods[n].weight for n in names]
    out = {
        n: torch.zeros(w.shape, dtype=torch.float64) for n, w in zip(names, weights, strict=True)
    }
    for s in data:
        grads = torch.autograd.grad(hand_loss(loaded, s, tokens), weights)
        for n, w, g in zip(names, weights, grads, strict=True):
            out[n] += (w.detach() * g).abs().double()
    return out


def close(fast: torch.Tensor, slow: torch.Tensor, rtol: float = 1e-4) -> bool:
    return torch.allclose(fast.double(), slow, rtol=rtol, atol=rtol * float(slow.abs().max()))


@pytest.mark.parametrize("tokens", ["response", "all"])
def test_scores_equal_autograd_by_hand(any_tiny, tokens):
    """Three samples in batches of two: the sum of per-sample |W ⊙ g| within and across
    batches, on every decoder linear (GQA, MHA, and LLaVA-NeXT with images)."""
    loaded = any_tiny
    data = samples(loaded, 3)
    fast = snip_scores(loaded, data, WandaConfig(tokens=tokens, batch_size=2))
    names = loaded.adapter.linear_names()
    assert list(fast) == names
    slow = hand_scores(loaded, data, names, tokens)
    for n in names:
        assert fast[n].dtype == torch.float32 and fast[n].shape == slow[n].shape
        assert close(fast[n], slow[n]), n


def test_scores_sum_per_sample_absolute_values(tiny_llama):
    """The reference adds ``|grad|`` after each sample: sum |W ⊙ g_s|, which differs from
    |W ⊙ sum g_s| (the accumulated gradient) and is the same for any batch size."""
    loaded = tiny_llama
    data = samples(loaded, 3)
    name = loaded.adapter.linear_name(1, "o_proj")
    w = loaded.adapter.linear(1, "o_proj").weight
    summed = sum(torch.autograd.grad(hand_loss(loaded, s), [w])[0] for s in data)
    abs_of_sum = (w.detach() * summed).abs().double()
    per_batch = {b: snip_scores(loaded, data, WandaConfig(batch_size=b))[name] for b in (1, 2, 3)}
    assert not close(per_batch[3], abs_of_sum, rtol=1e-2)
    assert close(per_batch[1], per_batch[3].double()) and close(per_batch[2], per_batch[3].double())


def test_gradient_against_finite_differences(tiny_llama, monkeypatch):
    """float64: |W_ij * (L(W + h e_ij) - L(W - h e_ij)) / 2h| for the largest and two other
    entries of three linears equals the score, independently of autograd. transformers'
    RMSNorm computes in float32 whatever the input, which would limit the differences to
    about 1e-3; it is replaced by the same formula in the input's dtype."""
    from transformers.models.llama import modeling_llama

    def rms_norm(self, x):
        return (
            self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm)
    loaded = tiny_llama
    loaded.model.double()
    data = samples(loaded, 1)
    scores = snip_scores(loaded, data, WandaConfig(batch_size=1))
    h = 1e-6
    for layer, proj in [(0, "q_proj"), (0, "v_proj"), (1, "down_proj")]:
        name = loaded.adapter.linear_name(layer, proj)
        w = loaded.adapter.linear(layer, proj).weight
        s = scores[name]
        for f in [int(s.argmax()), 77, 1000]:
            i, j = divmod(f, s.shape[1])
            with torch.no_grad():
                orig = w[i, j].clone()
                w[i, j] = orig + h
                up = hand_loss(loaded, data[0])
                w[i, j] = orig - h
                down = hand_loss(loaded, data[0])
                w[i, j] = orig
            expect = abs(float(orig) * float((up - down) / (2 * h)))
            assert s[i, j].item() == pytest.approx(expect, rel=1e-5, abs=1e-6 * float(s.max()))


def test_final_logit_softcapping_is_applied(tiny_llama):
    """A tiny Gemma 2 (logits soft-capped at 5) with the tiny Llama's tokenizer: the scores
    follow the model's own (capped) logits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    tok = tiny_llama.tokenizer
    cfg = Gemma2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=5.0,
        pad_token_id=tok.pad_token_id,
    )
    model = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # logits large enough for the cap to matter
    loaded = LoadedModel(tiny_llama.spec, tiny_llama.path, model, tok, None, build_adapter(model))
    data = samples(loaded, 2)
    names = loaded.adapter.linear_names()
    fast = snip_scores(loaded, data, WandaConfig(batch_size=2))
    slow = hand_scores(loaded, data, names)
    for n in names:
        assert close(fast[n], slow[n]), n


def stable_sort_mask(score: torch.Tensor, cfg: WandaConfig) -> torch.Tensor:
    """The reference's rule (``_prune_core``): a stable sort of each row, its
    ``int(in * sparsity)`` first; N:M: in each group of M, the N first of a stable sort."""
    out_f, in_f = score.shape
    mask = torch.zeros_like(score, dtype=torch.bool)
    if cfg.structure == "n:m":
        for g in range(0, in_f, cfg.m):
            idx = torch.sort(score[:, g : g + cfg.m], dim=1, stable=True).indices[:, : cfg.n]
            mask[:, g : g + cfg.m].scatter_(1, idx, True)
        return mask
    idx = torch.sort(score, dim=1, stable=True).indices[:, : int(in_f * cfg.sparsity)]
    return mask.scatter_(1, idx, True)


CONFIGS = [
    WandaConfig(sparsity=0.5, batch_size=2),
    WandaConfig(sparsity=0.3, batch_size=2),
    WandaConfig(structure="n:m", n=2, m=4, batch_size=2),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["50%", "30%", "2:4"])
def test_masks_equal_a_stable_sort_of_the_scores(tiny_mha, cfg):
    loaded = tiny_mha
    w = loaded.adapter.linear(0, "q_proj").weight
    with torch.no_grad():
        w[0, 10:50] = 0  # 40 tied zero scores in row 0: the earlier ones are pruned first
    data = samples(loaded, 3)
    scores = snip_scores(loaded, data, cfg)
    masks = snip_masks(loaded, data, cfg)
    assert list(masks) == list(scores)
    for n, score in scores.items():
        want = stable_sort_mask(score, cfg)
        assert torch.equal(masks[n].unpack(), want), n
        assert masks[n].count == int(want.sum())
    if cfg.structure == "unstructured":
        row0 = masks[loaded.adapter.linear_name(0, "q_proj")].unpack()[0]
        k = int(row0.numel() * cfg.sparsity)
        assert row0[10 : 10 + k].all() and not row0[10 + k : 50].any()


@pytest.mark.parametrize("cfg", CONFIGS[::2], ids=["50%", "2:4"])
def test_sequential_masks_prune_layer_by_layer(tiny_llama, cfg):
    """The reference's ``prune_wandg``: layer i's scores with layers < i pruned (here by hand:
    zero them, take the dense-path scores, keep layer i's), later layers dense."""
    loaded = tiny_llama
    a = loaded.adapter
    data = samples(loaded, 3)
    seq_cfg = WandaConfig(
        sparsity=cfg.sparsity, structure=cfg.structure, mode="sequential", batch_size=2
    )
    dense = {n: m.weight.detach().clone() for n, _, _, m in a.iter_linears()}
    fast = snip_masks(loaded, data, seq_cfg)
    for n, _, _, m in a.iter_linears():
        assert torch.equal(m.weight, dense[n]), n
    one_shot = snip_masks(loaded, data, cfg)
    slow = {}
    for layer in range(a.num_layers):
        scores = snip_scores(loaded, data, cfg)
        for n, lay, _, _ in a.iter_linears():
            if lay == layer:
                slow[n] = stable_sort_mask(scores[n], cfg)
        with torch.no_grad():
            for n, lay, _, m in a.iter_linears():
                if lay == layer:
                    m.weight.mul_(~slow[n])
    assert list(fast) == list(slow)
    for n in slow:
        assert torch.equal(fast[n].unpack(), slow[n]), n
    for n, lay, _, _ in a.iter_linears():
        same = torch.equal(fast[n].unpack(), one_shot[n].unpack())
        assert same == (lay == 0), n  # only the first layer sees a dense model in both


@pytest.mark.parametrize("cfg", CONFIGS, ids=["50%", "30%", "2:4"])
def test_magnitude_masks_equal_a_sort_of_abs_w(tiny_llama, cfg):
    loaded = tiny_llama
    w = loaded.adapter.linear(1, "up_proj").weight
    with torch.no_grad():
        w[3, :40] = -w[3, :40].abs().min()  # ties of |W| with both signs
        w[3, :40:2] *= -1
    masks = magnitude_masks(loaded, cfg)
    assert list(masks) == loaded.adapter.linear_names()
    for n, _, _, m in loaded.adapter.iter_linears():
        want = stable_sort_mask(m.weight.detach().abs().float(), cfg)
        assert torch.equal(masks[n].unpack(), want), n
        assert masks[n].count == int(want.sum())


def model_state(loaded):
    return {n: (p.detach().clone(), p.requires_grad) for n, p in loaded.model.named_parameters()}


def assert_state(loaded, before) -> None:
    for n, p in loaded.model.named_parameters():
        w, flag = before[n]
        assert torch.equal(p.detach().view(torch.uint8), w.view(torch.uint8)), n  # bit-exact
        assert p.requires_grad == flag, n
        assert p.grad is None, n
    assert count_hooks(loaded.model) == 0


def set_mixed_flags(loaded) -> None:
    """Some parameters frozen, some not, so that restoring is not merely setting all True."""
    for i, (_, p) in enumerate(loaded.model.named_parameters()):
        p.requires_grad_(i % 3 != 0)


RUNS = {
    "scores": lambda lo, d, stop: snip_scores(lo, d, WandaConfig(batch_size=1), should_stop=stop),
    "one-shot": lambda lo, d, stop: snip_masks(lo, d, WandaConfig(batch_size=1), should_stop=stop),
    "sequential": lambda lo, d, stop: snip_masks(
        lo, d, WandaConfig(batch_size=1, mode="sequential"), should_stop=stop
    ),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_model_left_as_it_was(any_tiny, run):
    loaded = any_tiny
    set_mixed_flags(loaded)
    with torch.no_grad():  # negative zeros come back as negative zeros
        loaded.adapter.linear(0, "k_proj").weight[0, :5] = -0.0
    before = model_state(loaded)
    data = samples(loaded, 2)
    with torch.no_grad():  # a caller's no_grad does not stop the gradients
        out = RUNS[run](loaded, data, None)
    assert len(out) == len(loaded.adapter.linear_names())
    assert_state(loaded, before)


@pytest.mark.parametrize("run", list(RUNS))
def test_stop_leaves_the_model_as_it_was(tiny_llama, run, monkeypatch):
    """Stopped in the second pass over the samples (sequential: with layer 0 pruned)."""
    loaded = tiny_llama
    set_mixed_flags(loaded)
    before = model_state(loaded)
    data = samples(loaded, 3)
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) == (5 if run == "sequential" else 2)

    if run == "sequential":  # the weights really are pruned when the stop comes
        import hsr_core.snip as snip

        pruned = []

        def spy(weight, mask):
            apply_mask(weight, mask)
            pruned.append(int((weight == 0).sum()) >= mask.count)

        monkeypatch.setattr(snip, "apply_mask", spy)
    with pytest.raises(Cancelled):
        RUNS[run](loaded, data, stop)
    if run == "sequential":
        assert pruned == [True] * 7  # layer 0's seven linears were pruned before the stop
    assert_state(loaded, before)


def test_no_response_tokens_is_a_clear_error(tiny_llama):
    data = [Sample(prompt="Tell me a story."), Sample(prompt="What is 2 + 2?")]
    before = model_state(tiny_llama)
    with pytest.raises(ValueError, match="no response tokens were selected"):
        snip_scores(tiny_llama, data, WandaConfig(batch_size=2))
    assert_state(tiny_llama, before)
    scores = snip_scores(tiny_llama, data, WandaConfig(batch_size=2, tokens="all"))
    assert all(bool((s > 0).any()) for s in scores.values())
