"""SNIP (``hsr_core.snip``) against slow, obvious references: fast enough for mutation runs.

Pure pieces first (the image token ids, ``loss_targets`` and ``_logits`` by hand, the
per-sample gradient hook on one linear against outer products written out), then a tiny
Llama built in memory (no save, no load): the scores against autograd on the full model with
one plain loss per sample, the batch loss by hand, one-shot masks against per-row sorts and
N:M by brute force, sequential masks against a model pruned a layer at a time, the errors,
the progress bar and the stop flag.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from oracles import memory_llama, pruned_layer_by_layer, slow_nm_mask, slow_row_mask
from torch import nn

# imported here, not in the fixtures: collecting the file then loads the model code (seconds),
# once for a mutation run's every mutant instead of once per mutant
from transformers import LlamaForCausalLM  # noqa: F401

from hsr_core import encoding, snip
from hsr_core.config import WandaConfig
from hsr_core.data import Sample, builtin_calibration
from hsr_core.encoding import Batch, encode_one, iter_batches
from hsr_core.hooks import count_hooks
from hsr_core.models import LoadedModel
from hsr_core.progress import Cancelled
from hsr_core.snip import (
    _batch_loss,
    _gradient_pass,
    _image_token_ids,
    _logits,
    _SampleGradients,
    loss_targets,
    snip_masks,
    snip_scores,
)

NO_RESPONSE = (
    "no response tokens were selected for the SNIP loss: the samples have no responses "
    "(or are empty); give answers or use tokens='all'"
)
NO_TOKEN = (
    "no non-padding tokens were selected for the SNIP loss: the samples have no responses "
    "(or are empty); give answers or use tokens='all'"
)

# ---------------------------------------------------------------------------------------------
# pure pieces


def fake_model(**config) -> types.SimpleNamespace:
    return types.SimpleNamespace(config=types.SimpleNamespace(**config))


def test_image_token_ids_by_hand():
    assert _image_token_ids(fake_model()) == []
    assert _image_token_ids(fake_model(image_token_id=5)) == [5]
    assert _image_token_ids(fake_model(image_token_index=7)) == [7]
    assert _image_token_ids(fake_model(video_token_id=9)) == [9]
    assert _image_token_ids(
        fake_model(image_token_id=3, image_token_index=2, video_token_id=1)
    ) == [3, 2, 1]
    assert _image_token_ids(
        fake_model(image_token_id=5, image_token_index=5, video_token_id=9)
    ) == [5, 9]  # one entry for an id named twice
    assert _image_token_ids(fake_model(image_token_id=None, video_token_id=[4])) == []


def hand_batch() -> Batch:
    ids = torch.tensor([[1, 2, 3, 4, 0, 0], [5, 3, 6, 6, 2, 0]])
    att = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
    resp = torch.tensor(
        [[False, False, True, True, False, False], [False, False, False, True, True, False]]
    )
    return Batch({"input_ids": ids, "attention_mask": att}, resp, [2, 3])


def test_loss_targets_by_hand():
    batch = hand_batch()
    got = loss_targets(batch, "response", [3, 6])
    assert got.dtype == torch.bool and torch.equal(got, batch.response_mask)
    every = loss_targets(batch, "all")
    assert every.dtype == torch.bool
    assert torch.equal(every, batch.inputs["attention_mask"].bool())
    some = loss_targets(batch, "all", [3, 6])
    want = torch.tensor(
        [[True, True, False, True, False, False], [True, False, False, False, True, False]]
    )
    assert some.dtype == torch.bool and torch.equal(some, want)
    assert torch.equal(loss_targets(batch, "all", [6]), want | (batch.inputs["input_ids"] == 3))


def fake_loaded_head(dtype: torch.dtype, config: object) -> types.SimpleNamespace:
    torch.manual_seed(3)
    head = nn.Linear(4, 6, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.mul_(40)  # logits large enough for a cap of 5 to matter
    return types.SimpleNamespace(
        adapter=types.SimpleNamespace(lm_head=head), model=types.SimpleNamespace(config=config)
    )


def test_logits_dtype_and_softcap_by_hand():
    h = torch.randn(3, 4, generator=torch.Generator().manual_seed(4))
    plain = types.SimpleNamespace()
    for dtype, want in [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ]:
        lo = fake_loaded_head(dtype, plain)
        got = _logits(lo, h.to(dtype))
        assert got.dtype == want
        assert torch.equal(got, lo.adapter.lm_head(h.to(dtype)).to(want))
    lo = fake_loaded_head(torch.float32, plain)
    raw = lo.adapter.lm_head(h)
    assert float(raw.detach().abs().max()) > 10
    capped = torch.tanh(raw / 5.0) * 5.0
    for config in [
        types.SimpleNamespace(final_logit_softcapping=5.0),
        types.SimpleNamespace(  # a vision model's: the cap is in its text config
            get_text_config=lambda: types.SimpleNamespace(final_logit_softcapping=5.0)
        ),
    ]:
        got = _logits(fake_loaded_head(torch.float32, config), h)
        assert torch.equal(got, capped)
    for cap in (None, 0.0):
        got = _logits(
            fake_loaded_head(
                torch.float32,
                types.SimpleNamespace(
                    final_logit_softcapping=cap,
                    get_text_config=lambda cap=cap: types.SimpleNamespace(
                        final_logit_softcapping=cap
                    ),
                ),
            ),
            h,
        )
        assert torch.equal(got, raw)


def test_sample_gradients_sum_per_sample_outer_products():
    """The hook on one linear: sum over samples of |sum_t δ_t x_tᵀ|, δ = ∂L/∂Y, written out;
    the linear's output made a leaf when its input needs no gradient."""
    g = torch.Generator().manual_seed(6)
    lin = nn.Linear(3, 4, bias=False)
    lin.weight.requires_grad_(False)
    x = torch.randn(2, 5, 3, generator=g)  # [batch, seq, in], no gradient
    c = torch.randn(2, 5, 4, generator=g)
    grads = _SampleGradients({"lin": lin})
    assert grads.batch_size == 0
    assert grads.sums["lin"].dtype == torch.float32
    assert torch.equal(grads.sums["lin"], torch.zeros(4, 3))
    grads.batch_size = 2
    handle = lin.register_forward_hook(grads.hook("lin"))
    with torch.enable_grad():
        out = lin(x)
        assert out.requires_grad and out.is_leaf
        (out * c).sum().backward()
    handle.remove()
    want = torch.zeros(4, 3, dtype=torch.float64)
    for s in range(2):
        one = torch.zeros(4, 3, dtype=torch.float64)
        for t in range(5):
            for i in range(4):
                for j in range(3):
                    one[i, j] += float(c[s, t, i]) * float(x[s, t, j])
        want += one.abs()
    assert torch.allclose(grads.sums["lin"].double(), want, rtol=1e-5, atol=1e-6)
    # twice: the sums go on adding; an input that needs a gradient keeps its graph
    x2 = x.clone().requires_grad_(True)
    handle = lin.register_forward_hook(grads.hook("lin"))
    with torch.enable_grad():
        out = lin(x2)
        assert not out.is_leaf
        (out * c).sum().backward()
    handle.remove()
    assert torch.allclose(grads.sums["lin"].double(), 2 * want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(x2.grad, c @ lin.weight)


def test_sample_gradients_sums_on_the_weights_device_in_float32():
    mods = {
        "a": nn.Linear(3, 4, device="meta", dtype=torch.bfloat16),
        "b": nn.Linear(2, 5, dtype=torch.float64),
    }
    grads = _SampleGradients(mods)
    assert list(grads.sums) == ["a", "b"]
    assert grads.sums["a"].device.type == "meta" and grads.sums["a"].shape == (4, 3)
    assert grads.sums["b"].device.type == "cpu" and grads.sums["b"].shape == (5, 2)
    assert grads.sums["a"].dtype == grads.sums["b"].dtype == torch.float32
    default = torch.get_default_dtype()
    try:  # float32 whatever the default dtype
        torch.set_default_dtype(torch.float64)
        assert _SampleGradients(mods).sums["b"].dtype == torch.float32
    finally:
        torch.set_default_dtype(default)


# ---------------------------------------------------------------------------------------------
# a tiny Llama built in memory


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    """The built-in tiny Llama's shape (2 layers, 4 heads, 2 KV heads), not saved or loaded;
    SNIP leaves its weights as they were (asserted where it prunes)."""
    return memory_llama()


def data(n: int) -> list[Sample]:
    return builtin_calibration().utility[:n]


def frequent_token(loaded: LoadedModel, sample: Sample) -> int:
    """A token that occurs several times in the sample, after its first position."""
    ids = encode_one(loaded, sample)[0]["input_ids"][0, 1:]
    values, counts = ids.unique(return_counts=True)
    return int(values[counts.argmax()])


def slow_loss(loaded, sample: Sample, tokens: str, image_ids=()) -> torch.Tensor | None:
    """One sample's loss from the full model's logits: the mean cross-entropy of its chosen
    tokens (the response's, or every token but the first and the image placeholders), each
    predicted from the position before it; None when none is chosen."""
    inputs, plen, rlen = encode_one(loaded, sample)
    ids = inputs["input_ids"][0]
    chosen = []
    for t in range(1, ids.shape[0]):
        if tokens == "response":
            if plen <= t < plen + rlen:
                chosen.append(t)
        elif int(ids[t]) not in image_ids:
            chosen.append(t)
    if not chosen:
        return None
    logits = loaded.model(**inputs, use_cache=False).logits[0].float()
    pos = torch.tensor(chosen)
    return F.cross_entropy(logits[pos - 1], ids[pos])


def slow_scores(loaded, samples, tokens: str, image_ids=(), names=None) -> dict:
    """``sum_s |W ⊙ ∂L_s/∂W|`` (float64): one ``torch.autograd.grad`` per sample on the whole
    model, every parameter requiring a gradient."""
    flags = [(p, p.requires_grad) for p in loaded.model.parameters()]
    mods = {n: m for n, _, _, m in loaded.adapter.iter_linears() if names is None or n in names}
    out = {n: torch.zeros(m.weight.shape, dtype=torch.float64) for n, m in mods.items()}
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        with torch.enable_grad():
            for s in samples:
                loss = slow_loss(loaded, s, tokens, image_ids)
                if loss is None:
                    continue
                grads = torch.autograd.grad(loss, [m.weight for m in mods.values()])
                for (n, m), g in zip(mods.items(), grads, strict=True):
                    out[n] += (m.weight.detach().double() * g.double()).abs()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return out


def assert_close(fast: dict, slow: dict) -> None:
    assert list(fast) == list(slow)
    for n in slow:
        assert fast[n].dtype == torch.float32 and fast[n].device.type == "cpu", n
        tol = 1e-4 * float(slow[n].abs().max())
        assert torch.allclose(fast[n].double(), slow[n], rtol=1e-4, atol=tol), n
        assert float(slow[n].abs().max()) > 0, n


class Bars:
    """``snip.bar`` replaced: its keyword arguments and each ``update``."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[dict] = []
        self.updates: list[int] = []

        def fake(**kw):
            self.calls.append(kw)
            return self

        monkeypatch.setattr(snip, "bar", fake)

    def __enter__(self) -> Bars:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int) -> None:
        self.updates.append(n)


class Moves:
    """``Batch.to`` wrapped: the device of each call."""

    def __init__(self, monkeypatch) -> None:
        self.devices: list = []
        original = encoding.Batch.to

        def to(batch, device):
            self.devices.append(device)
            return original(batch, device)

        monkeypatch.setattr(encoding.Batch, "to", to)


def state(loaded) -> dict:
    return {n: (p.detach().clone(), p.requires_grad) for n, p in loaded.model.named_parameters()}


def assert_state(loaded, before) -> None:
    for n, p in loaded.model.named_parameters():
        w, flag = before[n]
        assert torch.equal(p.detach(), w), n
        assert p.requires_grad == flag and p.grad is None, n
    assert count_hooks(loaded.model) == 0


@pytest.mark.parametrize("tokens", ["response", "all"])
def test_scores_equal_autograd_per_sample(llama, tokens, monkeypatch):
    """Three samples in batches of two (one padded batch, one of one sample); with ``all`` a
    frequent token is declared the image placeholder and left out of the loss."""
    samples = data(3)
    image = frequent_token(llama, samples[0])
    monkeypatch.setattr(llama.model.config, "image_token_id", image, raising=False)
    bars, moves = Bars(monkeypatch), Moves(monkeypatch)
    before = state(llama)
    fast = snip_scores(llama, samples, WandaConfig(tokens=tokens, batch_size=2))
    assert_state(llama, before)
    slow = slow_scores(llama, samples, tokens, [image] if tokens == "all" else [])
    assert list(fast) == llama.adapter.linear_names()
    assert_close(fast, slow)
    if tokens == "all":  # the placeholder really is left out: counted, the scores differ
        counted = slow_scores(llama, samples, tokens)
        name = llama.adapter.linear_name(1, "o_proj")
        assert not torch.allclose(counted[name], slow[name], rtol=1e-2)
    assert bars.calls == [{"desc": "SNIP gradients", "total": 2, "unit": "batch"}]
    assert bars.updates == [1, 1]
    assert moves.devices == [llama.device] * 2


def test_scores_skip_batches_without_tokens_and_take_names(llama, monkeypatch):
    """One sample a batch, two without a response; only some linears; called under
    ``torch.inference_mode`` (the gradients are taken all the same)."""
    samples = data(3)
    mixed = [Sample(samples[0].prompt), samples[1], samples[2], Sample(samples[0].prompt)]
    names = [
        llama.adapter.linear_name(0, "v_proj"),
        llama.adapter.linear_name(1, "q_proj"),
        llama.adapter.linear_name(1, "down_proj"),
    ]
    bars = Bars(monkeypatch)
    with torch.inference_mode():
        fast = snip_scores(llama, mixed, WandaConfig(batch_size=1), names=set(names))
    assert list(fast) == names
    assert_close(fast, slow_scores(llama, samples[1:], "response", names=names))
    assert bars.calls == [{"desc": "SNIP gradients", "total": 4, "unit": "batch"}]
    assert bars.updates == [1, 1, 1, 1]


def test_batch_loss_by_hand(llama):
    """Targets set by hand: a sample with one target token, one with three, one with none
    (the loss is the sum of each sample's mean)."""
    samples = data(3)
    batch = next(iter_batches(llama, samples, 3))
    targets = torch.zeros_like(batch.response_mask)
    targets[0, 4] = True
    targets[1, [3, 6, 7]] = True
    with torch.no_grad():
        got = _batch_loss(llama, batch, targets)
        logits = llama.model(**batch.inputs, use_cache=False).logits.float()
    ids = batch.inputs["input_ids"]
    want = F.cross_entropy(logits[0, 3:4], ids[0, 4:5]) + F.cross_entropy(
        logits[1, [2, 5, 6]], ids[1, [3, 6, 7]]
    )
    assert got.dim() == 0
    assert torch.allclose(got, want, rtol=1e-5), (got, want)


def test_no_selected_token_is_a_clear_error(llama):
    before = state(llama)
    with pytest.raises(ValueError) as e:
        snip_scores(llama, [Sample(s.prompt) for s in data(2)], WandaConfig(batch_size=1))
    assert str(e.value) == NO_RESPONSE
    assert_state(llama, before)
    one = Batch(  # a single token: nothing to predict, whatever the selection
        {"input_ids": torch.tensor([[5]]), "attention_mask": torch.tensor([[1]])},
        torch.tensor([[True]]),
        [0],
    )
    progress = types.SimpleNamespace(update=lambda n: None)
    for tokens, message in [("all", NO_TOKEN), ("response", NO_RESPONSE)]:
        with pytest.raises(ValueError) as e:
            _gradient_pass(llama, [one, one], WandaConfig(tokens=tokens), [0, 1], progress, None)
        assert str(e.value) == message
    assert_state(llama, before)


def test_a_two_token_sample_predicts_its_second_token(llama):
    """tokens='all': the only prediction is token 1's, from position 0."""
    ids = torch.tensor([[5, 7]])
    two = Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids == 0, [2])
    progress = types.SimpleNamespace(update=lambda n: None)
    name = llama.adapter.linear_name(1, "up_proj")
    fast = _gradient_pass(llama, [two], WandaConfig(tokens="all"), [1], progress, None)
    assert list(fast) == [n for n, lay, _, _ in llama.adapter.iter_linears() if lay == 1]
    w = llama.adapter.linear(1, "up_proj").weight
    with torch.enable_grad():
        logits = llama.model(input_ids=ids, use_cache=False).logits[0].float()
        (g,) = torch.autograd.grad(F.cross_entropy(logits[:1], ids[0, 1:]), [w])
    want = g.double().abs()
    assert float(want.max()) > 0
    assert torch.allclose(fast[name].double(), want, rtol=1e-4, atol=1e-4 * float(want.max()))


@pytest.mark.parametrize(
    "cfg",
    [
        WandaConfig(sparsity=0.5, batch_size=2),
        WandaConfig(sparsity=0.3, batch_size=2, tokens="all"),
        WandaConfig(structure="n:m", n=2, m=4, batch_size=2),
    ],
    ids=["50%", "30% all", "2:4"],
)
def test_one_shot_masks_equal_per_row_sorts(llama, cfg):
    samples = data(3)
    masks = snip_masks(llama, samples, cfg)
    scores = snip_scores(llama, samples, cfg)
    assert list(masks) == list(scores) == llama.adapter.linear_names()
    for n, score in scores.items():
        if cfg.structure == "n:m":
            want = slow_nm_mask(score, cfg.n, cfg.m)
        else:
            want = slow_row_mask(score, int(score.shape[1] * cfg.sparsity))
        assert torch.equal(masks[n].unpack(), want), n
        assert masks[n].count == int(want.sum()), n


def slow_sequential(loaded, samples, cfg: WandaConfig) -> dict:
    """The reference's ``prune_wandg``: layer ``i``'s scores by autograd with layers ``< i``
    pruned (zeroed), its masks by per-row sorts; the weights put back at the end."""
    a = loaded.adapter

    def layer_masks(layer: int) -> dict:
        names = [n for n, lay, _, _ in a.iter_linears() if lay == layer]
        scores = slow_scores(loaded, samples, cfg.tokens, names=names)
        if cfg.structure == "n:m":
            return {n: slow_nm_mask(scores[n], cfg.n, cfg.m) for n in names}
        return {n: slow_row_mask(scores[n], int(scores[n].shape[1] * cfg.sparsity)) for n in names}

    return pruned_layer_by_layer(loaded, layer_masks)


@pytest.mark.parametrize("structure", ["unstructured", "n:m"])
def test_sequential_masks_equal_a_model_pruned_a_layer_at_a_time(llama, structure, monkeypatch):
    """Called with gradients on and every parameter requiring one (the weights are put back
    under ``no_grad``); the weights and flags are as before on return."""
    samples = data(3)
    cfg = WandaConfig(structure=structure, mode="sequential", batch_size=2)
    for p in llama.model.parameters():
        p.requires_grad_(True)
    before = state(llama)
    bars, moves = Bars(monkeypatch), Moves(monkeypatch)
    with torch.enable_grad():
        fast = snip_masks(llama, samples, cfg)
    assert_state(llama, before)
    assert bars.calls == [{"desc": "SNIP gradients", "total": 4, "unit": "batch"}]
    assert bars.updates == [1] * 4
    assert moves.devices == [llama.device] * 4
    slow = slow_sequential(llama, samples, cfg)
    assert_state(llama, before)
    assert list(fast) == list(slow)
    for n in slow:
        assert torch.equal(fast[n].unpack(), slow[n]), n
        assert fast[n].count == int(slow[n].sum()), n
    one_shot = snip_masks(llama, samples, WandaConfig(structure=structure, batch_size=2))
    for n, lay, _, _ in llama.adapter.iter_linears():  # only layer 0 sees a dense model
        assert torch.equal(fast[n].unpack(), one_shot[n].unpack()) == (lay == 0), n


@pytest.mark.parametrize("run", ["scores", "one-shot", "sequential"])
def test_stop_when_asked(llama, run):
    """Stopped at the second poll (sequential: in layer 1's pass, with layer 0 pruned); the
    model as it was."""
    for i, p in enumerate(llama.model.parameters()):
        p.requires_grad_(i % 3 != 0)
    before = state(llama)
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) == (3 if run == "sequential" else 2)

    cfg = WandaConfig(batch_size=1, mode="sequential" if run == "sequential" else "one-shot")
    with pytest.raises(Cancelled):
        if run == "scores":
            snip_scores(llama, data(2), cfg, should_stop=stop)
        else:
            snip_masks(llama, data(2), cfg, should_stop=stop)
    assert len(asked) == (3 if run == "sequential" else 2)
    assert_state(llama, before)
    for p in llama.model.parameters():
        p.requires_grad_(True)
