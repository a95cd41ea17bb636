"""Loading through the real loader, the architecture adapter, and loading errors."""

from __future__ import annotations

import pytest
import torch

from hsr_core.builtin import build_tokenizer
from hsr_core.config import ConfigError, ModelSpec
from hsr_core.models import ArchitectureError, ModelLoadError, build_adapter, load_model


def test_tiny_models_map(tiny_llama, tiny_mha, tiny_llava):
    for loaded, kv, path in [
        (tiny_llama, 2, "model.layers"),
        (tiny_mha, 4, "model.layers"),
        (tiny_llava, 2, "model.language_model.layers"),
    ]:
        a = loaded.adapter
        assert (a.num_layers, a.num_heads, a.num_kv_heads, a.head_dim) == (2, 4, kv, 16)
        assert a.layers_path == path
        assert a.mlp_projs == ("gate_proj", "up_proj", "down_proj")
        assert a.linear(1, "k_proj").out_features == kv * 16
        assert a.parse(a.linear_name(1, "down_proj")) == (1, "down_proj")
        assert len(a.linear_names()) == 14 and len(a.linear_names(attention_only=True)) == 8
        info = loaded.describe()
        assert info["vision_tower"] == loaded.is_vision and info["num_kv_heads"] == kv
        assert loaded.path.is_dir() and (loaded.path / "config.json").exists()
    assert tiny_llava.is_vision and not tiny_llama.is_vision
    # the vision tower's layers are never taken for the decoder
    assert all("vision" not in n for n in tiny_llava.adapter.linear_names())


def test_builtin_is_reproducible(tmp_path):
    a = load_model("builtin:tiny-llama", cache_dir=tmp_path / "a")
    b = load_model("builtin:tiny-llama", cache_dir=tmp_path / "b")
    for (n, p), (_, q) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), n
    assert build_tokenizer().encode("I'm sorry") == a.tokenizer.encode("I'm sorry")


def test_loading_errors(tmp_path, monkeypatch, cache_root):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="Unknown built-in model 'nope'.*builtin:tiny-llama"):
        load_model("builtin:nope", cache_dir=cache_root)
    with pytest.raises(ModelLoadError, match="No folder"):
        load_model(str(tmp_path / "does" / "not" / "exist"), cache_dir=cache_root)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path), cache_dir=cache_root)
    with pytest.raises(ModelLoadError, match="Could not reach the Hugging Face hub"):
        load_model("some-org/some-model-that-is-not-cached", cache_dir=cache_root)
    with pytest.raises(ConfigError, match="dtype"):
        ModelSpec("x", dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA GPU"):
            load_model(ModelSpec("builtin:tiny-llama", device="cuda"), cache_dir=cache_root)
    assert ModelSpec("x").trust_remote_code is False


def test_unsupported_architectures(tmp_path, cache_root):
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        GPT2Config,
        GPT2LMHeadModel,
        ViTConfig,
        ViTModel,
    )

    tok = build_tokenizer()
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=len(tok))
    ).save_pretrained(gpt2)
    tok.save_pretrained(gpt2)
    with pytest.raises(
        ArchitectureError,
        match=r"GPT2LMHeadModel: could not find a ModuleList of decoder layers, each with self_attn\.\{q,k,v,o\}_proj",
    ):
        load_model(str(gpt2), cache_dir=cache_root)
    bert = tmp_path / "bert"
    BertForMaskedLM(
        BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(bert)
    with pytest.raises(ArchitectureError, match="BertLMHeadModel: could not find"):
        load_model(str(bert), cache_dir=cache_root)
    vit = tmp_path / "vit"
    ViTModel(
        ViTConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(vit)
    with pytest.raises(
        ArchitectureError, match="neither a causal language model nor an image-text-to-text"
    ):
        load_model(str(vit), cache_dir=cache_root)
    with pytest.raises(ArchitectureError):
        build_adapter(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("arch", ["qwen2-vl", "qwen2.5-vl"])
def test_qwen_vl_processor_without_torchvision(arch, arch_folder, tmp_path):
    """Qwen2-VL's processor holds a video processor that needs torchvision, which the project
    does not install: the loader builds it for images only, from a folder that names a video
    processor (as the hub's do) or one that has none (as an export of this project)."""
    import json
    import shutil

    folder = shutil.copytree(arch_folder(arch), tmp_path / arch)
    cfg_file = folder / "processor_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["video_processor"] = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "patch_size": 8,
        "merge_size": 2,
        "temporal_patch_size": 2,
    }
    cfg_file.write_text(json.dumps(cfg))
    loaded = load_model(str(folder))
    assert type(loaded.processor).__name__ == cfg["processor_class"]
    from hsr_core.data import render_text_image

    inputs = loaded.processor(
        text="<|vision_start|><|image_pad|><|vision_end|>hi", images=render_text_image("hi")
    )
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]  # 32x32 pixels, 8-pixel patches
    # any other failure to load the processor is not hidden
    del cfg["image_processor"]
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(OSError, match="image processor"):
        load_model(str(folder))
