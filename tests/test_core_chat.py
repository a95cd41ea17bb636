"""Streaming chat replies: equal to plain generate, a stop that really stops, seeds."""

from __future__ import annotations

import threading

import pytest
import torch

from hsr_core.chat import GenerationSettings, chat_inputs, stream_reply
from hsr_core.config import ConfigError
from hsr_core.data import render_text_image

HISTORY = [{"role": "user", "content": "Tell me about the sea."}]


def test_greedy_stream_equals_generate(tiny_llama):
    settings = GenerationSettings(max_new_tokens=12)
    *_, final = stream_reply(tiny_llama, HISTORY, settings)
    inputs = chat_inputs(tiny_llama, HISTORY)
    out = tiny_llama.model.generate(
        **inputs, max_new_tokens=12, do_sample=False, pad_token_id=tiny_llama.tokenizer.pad_token_id
    )
    expected = tiny_llama.tokenizer.decode(
        out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert final == expected


def test_stop_ends_generation_early(tiny_llama):
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] >= 3

    pieces = list(
        stream_reply(tiny_llama, HISTORY, GenerationSettings(max_new_tokens=200), should_stop=stop)
    )
    full = list(stream_reply(tiny_llama, HISTORY, GenerationSettings(max_new_tokens=200)))
    assert calls["n"] == 3  # checked after every token, and nothing ran on after the stop
    assert len(tiny_llama.tokenizer(pieces[-1])["input_ids"]) < len(
        tiny_llama.tokenizer(full[-1])["input_ids"]
    )


def test_leaving_early_stops_the_worker(tiny_llama):
    before = set(threading.enumerate())
    gen = stream_reply(tiny_llama, HISTORY, GenerationSettings(max_new_tokens=500))
    next(gen)
    gen.close()  # e.g. the browser went away
    # no thread started here is still alive (other tests' threads may end meanwhile)
    assert set(threading.enumerate()) <= before


def test_seed_makes_sampling_reproducible(tiny_llama):
    s = GenerationSettings(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    a = list(stream_reply(tiny_llama, HISTORY, s))[-1]
    b = list(stream_reply(tiny_llama, HISTORY, s))[-1]
    c = list(
        stream_reply(
            tiny_llama, HISTORY, GenerationSettings(max_new_tokens=10, temperature=1.0, seed=8)
        )
    )[-1]
    assert a == b and a != c


def test_images_and_bad_settings(tiny_llama, tiny_llava):
    with pytest.raises(ValueError, match="text-only"):
        chat_inputs(tiny_llama, HISTORY, image=render_text_image("hi"))
    inputs = chat_inputs(tiny_llava, HISTORY, image=render_text_image("hi"))
    assert "pixel_values" in inputs
    assert list(
        stream_reply(
            tiny_llava, HISTORY, GenerationSettings(max_new_tokens=4), image=render_text_image("hi")
        )
    )
    with pytest.raises(ConfigError):
        GenerationSettings(temperature=-1)
    with pytest.raises(ValueError, match="end with a user message"):
        chat_inputs(tiny_llama, [{"role": "assistant", "content": "x"}])
    assert torch.is_tensor(chat_inputs(tiny_llama, HISTORY, system_prompt="Be brief.")["input_ids"])
