"""Oracles for ``evaluate.generate`` and ``evaluate.perplexity`` (mutation testing, issue 18):
the answers to a system prompt against one-at-a-time generation from prompts encoded by hand,
the progress bar's arguments, the stop flag and the perplexity of nothing."""

from __future__ import annotations

import math

import pytest
import torch

# the model classes once at collection, not in each mutant's test run (docs/MUTATION.md)
import transformers.models.llama.modeling_llama  # noqa: F401

from hsr_core import evaluate as ev
from hsr_core.config import EvalConfig
from hsr_core.data import Sample
from hsr_core.encoding import encode_one
from hsr_core.progress import Cancelled

SYSTEM = "You are a pirate. Answer in one word."
PROMPTS = ["Hi", "Tell me a story about a dragon.", "2+2?", "Name a colour.", "Why?"]


def one_by_one(loaded, samples, max_new_tokens: int, system: str | None) -> list[str]:
    """Greedy answers, one prompt at a time, from the chat template applied here."""
    tok = loaded.tokenizer
    out = []
    with torch.no_grad():
        for s in samples:
            inputs, _, _ = encode_one(loaded, Sample(s.prompt), system=system)
            ids = loaded.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            new = ids[0, inputs["input_ids"].shape[1] :]
            out.append(tok.decode(new, skip_special_tokens=True).strip())
    return out


def test_generate_with_a_system_prompt_equals_one_by_one(tiny_llama):
    # reference answers are not part of the prompt
    samples = [Sample(p, response="Arr.") for p in PROMPTS]
    cfg = EvalConfig(max_new_tokens=6, batch_size=2)
    with_system = ev.generate(tiny_llama, samples, cfg, system=SYSTEM)
    assert with_system == one_by_one(tiny_llama, samples, 6, SYSTEM)
    # the system prompt changes what this model says, so the check above can fail
    assert with_system != one_by_one(tiny_llama, samples, 6, None)


def test_a_row_that_ends_early_keeps_its_answer_and_the_generation_stays_greedy(tiny_llama):
    """The model's own generation config is overridden where it would change the answers:
    sampling on, a visible pad token. One row of the batch ends at its first token (made the
    end-of-sequence token), so the rest of its row is padding, which must not show."""
    tok, cfg = tiny_llama.tokenizer, tiny_llama.model.generation_config
    samples = [Sample(p) for p in PROMPTS[:2]]
    first = one_by_one(tiny_llama, samples[:1], 1, None)
    first_id = tok(first[0], add_special_tokens=False)["input_ids"][0]
    visible = next(i for i in range(5, len(tok)) if i not in (first_id, *tok.all_special_ids))
    cfg.eos_token_id, cfg.pad_token_id = first_id, visible
    cfg.do_sample, cfg.temperature, cfg.top_k = True, 50.0, 0
    want = one_by_one(tiny_llama, samples, 6, None)
    assert len(want[0]) < len(want[1])  # the first row ended early
    torch.manual_seed(0)
    assert ev.generate(tiny_llama, samples, EvalConfig(max_new_tokens=6, batch_size=2)) == want


def test_generate_counts_its_batches_on_a_bar_of_its_own(tiny_llama, monkeypatch):
    made = []
    real_bar = ev.bar

    def recording_bar(iterable, **kwargs):
        made.append(kwargs)
        return real_bar(iterable, **kwargs)

    monkeypatch.setattr(ev, "bar", recording_bar)
    samples = [Sample(p) for p in PROMPTS]
    ev.generate(tiny_llama, samples, EvalConfig(max_new_tokens=1, batch_size=2))
    ev.generate(tiny_llama, samples[:4], EvalConfig(max_new_tokens=1, batch_size=4), desc="Judging")
    assert made == [
        {"desc": "Generating", "total": 3, "unit": "batch"},  # ceil(5 / 2)
        {"desc": "Judging", "total": 1, "unit": "batch"},
    ]


def test_perplexity_reads_the_stop_flag_and_is_nan_without_answers(tiny_llama):
    with_answer = [Sample("Hi", response="Hello there."), Sample("2+2?", response="4.")]
    assert math.isfinite(ev.perplexity(tiny_llama, with_answer, should_stop=lambda: False))
    with pytest.raises(Cancelled):
        ev.perplexity(tiny_llama, with_answer, should_stop=lambda: True)
    assert math.isnan(ev.perplexity(tiny_llama, [Sample("Hi"), Sample("Why?")]))
    assert math.isnan(ev.perplexity(tiny_llama, []))
