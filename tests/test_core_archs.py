"""Every supported architecture through the real loader (issue 18).

``any_tiny`` gives each tiny model in turn: the built-in Llama (GQA) and LLaVA-NeXT, an MHA
Llama, and the test-side Mistral, Qwen2, plain LLaVA, Qwen2-VL and Qwen2.5-VL of
``tests/tiny_models.py``. Ships, restore set and Wanda statistics are checked against their
slow references on each in test_core_ships, test_core_realign and test_core_wanda; here: the
mapping, every variant transition, batched (left-padded) generation against one prompt at a
time, and perplexity against a plain forward pass per sample.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_oracle_variants import World, run_every_transition

from hsr_core.config import EvalConfig
from hsr_core.data import Sample, builtin_eval, with_typographic_images
from hsr_core.encoding import encode_one
from hsr_core.evaluate import generate, perplexity
from hsr_core.models import load_model

ARCHITECTURES = {
    "gqa": "LlamaForCausalLM",
    "mha": "LlamaForCausalLM",
    "llava": "LlavaNextForConditionalGeneration",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "plain-llava": "LlavaForConditionalGeneration",
    "qwen2-vl": "Qwen2VLForConditionalGeneration",
    "qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration",
}


def prompts(loaded, samples):
    return with_typographic_images(samples) if loaded.is_vision else list(samples)


def test_maps_the_language_decoder(any_tiny, request):
    loaded = any_tiny
    arch = request.node.callspec.params["any_tiny"]
    if arch not in ARCHITECTURES:
        pytest.skip(f"{arch}: its own geometry, mapped in its own test")
    a = loaded.adapter
    assert type(loaded.model).__name__ == ARCHITECTURES[arch]
    kv = 4 if arch == "mha" else 2
    assert (a.num_layers, a.num_heads, a.num_kv_heads, a.head_dim) == (2, 4, kv, 16)
    assert a.mlp_projs == ("gate_proj", "up_proj", "down_proj")
    assert a.layers_path == ("model.language_model.layers" if loaded.is_vision else "model.layers")
    assert loaded.is_vision == (arch in ("llava", "plain-llava", "qwen2-vl", "qwen2.5-vl"))
    # the linears HSR works on are exactly the decoder's, never the vision tower's
    decoder = {n for n, m in a.layers.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n.removeprefix(a.layers_path + ".") for n in a.linear_names()} == decoder


def test_reloads_its_own_save(any_tiny, tmp_path):
    """A saved model (what the app's export writes) loads again through the loader, the same
    weights and the same processor behaviour (Qwen-VL's without torchvision included)."""
    loaded = any_tiny
    loaded.model.save_pretrained(tmp_path)
    (loaded.processor or loaded.tokenizer).save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    for (n, p), (_, q) in zip(
        loaded.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), n
    sample = prompts(loaded, [Sample("What is a cat?")])[0]
    one, two = encode_one(loaded, sample)[0], encode_one(again, sample)[0]
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_every_variant_transition(any_tiny, tmp_path):
    run_every_transition(World(any_tiny), tmp_path)


def test_batched_generation_equals_one_by_one(any_tiny):
    loaded = any_tiny
    samples = prompts(
        loaded,
        [Sample("Hi"), Sample("Tell me a long story about a dragon and a castle."), Sample("2+2?")],
    )
    batched = generate(loaded, samples, EvalConfig(max_new_tokens=6, batch_size=3))
    single = [generate(loaded, [s], EvalConfig(max_new_tokens=6, batch_size=1))[0] for s in samples]
    assert batched == single
    assert any(batched)  # random weights still say something


def test_perplexity_equals_a_forward_per_sample(any_tiny):
    loaded = any_tiny
    samples = prompts(loaded, [s for s in builtin_eval() if s.response][:3])
    nll, count = 0.0, 0
    with torch.inference_mode():
        for s in samples:
            inputs, plen, rlen = encode_one(loaded, s)
            logits = loaded.model(**inputs, use_cache=False).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            ids = inputs["input_ids"][0]
            for t in range(plen, plen + rlen):
                nll -= float(logp[t - 1, ids[t]])
                count += 1
    fast = perplexity(loaded, samples, batch_size=3)
    assert math.isfinite(fast)
    assert fast == pytest.approx(math.exp(nll / count), rel=1e-4)
