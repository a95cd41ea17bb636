"""Chat in the core: chat inputs, the turn engine (``stream_columns``) equal to plain generate,
a stop that really stops, seeds, throttled streaming, and the runner it is given."""

from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from hsr_core.chat import chat_inputs, stream_columns
from hsr_core.config import ConfigError, GenerationSettings
from hsr_core.data import render_text_image
from hsr_core.worker import ModelThread

HISTORY = [{"role": "user", "content": "Tell me about the sea."}]
COLUMNS = ("original", "pruned", "realigned")


class _Variants:
    """The real model behind ``use``, recording which variant was asked for."""

    def __init__(self, loaded) -> None:
        self.loaded, self.used = loaded, []

    @contextmanager
    def use(self, name: str):
        self.used.append(name)
        yield self.loaded


@pytest.fixture
def runner():
    thread = ModelThread("test-chat")
    yield thread
    thread.shutdown()


def reply(loaded, runner, settings, *, history=HISTORY, **kw) -> list:
    """The texts streamed for one column (the last one is the final text)."""
    jobs = [("original", history)]
    return [
        r.text
        for r in stream_columns(lambda: _Variants(loaded), jobs, settings, runner=runner, **kw)
    ]


def test_greedy_stream_equals_generate(tiny_llama, runner):
    *_, final = reply(tiny_llama, runner, GenerationSettings(max_new_tokens=12))
    inputs = chat_inputs(tiny_llama, HISTORY)
    out = tiny_llama.model.generate(
        **inputs, max_new_tokens=12, do_sample=False, pad_token_id=tiny_llama.tokenizer.pad_token_id
    )
    expected = tiny_llama.tokenizer.decode(
        out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert final == expected


def test_stop_ends_generation_early(tiny_llama, runner):
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] >= 3

    jobs = [("original", HISTORY)]
    events = list(
        stream_columns(
            lambda: _Variants(tiny_llama),
            jobs,
            GenerationSettings(max_new_tokens=200),
            runner=runner,
            should_stop=stop,
        )
    )
    pieces = [r.text for r in events]
    full = reply(tiny_llama, runner, GenerationSettings(max_new_tokens=200))
    # polled before the reply, after each token (the 2nd token's check says stop), and once
    # when the reply ends: nothing ran on after the stop
    assert calls["n"] == 4 and events[-1].done and events[-1].stopped and events[-1].tokens == 2
    assert len(tiny_llama.tokenizer(pieces[-1])["input_ids"]) < len(
        tiny_llama.tokenizer(full[-1])["input_ids"]
    )


def test_seed_makes_sampling_reproducible(tiny_llama, runner):
    s = GenerationSettings(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    a = reply(tiny_llama, runner, s)[-1]
    b = reply(tiny_llama, runner, s)[-1]
    c = reply(tiny_llama, runner, GenerationSettings(max_new_tokens=10, temperature=1.0, seed=8))[
        -1
    ]
    assert a == b and a != c


def test_images_and_bad_settings(tiny_llama, tiny_llava, runner):
    with pytest.raises(ValueError, match="text-only"):
        chat_inputs(tiny_llama, HISTORY, image=render_text_image("hi"))
    inputs = chat_inputs(tiny_llava, HISTORY, image=render_text_image("hi"))
    assert "pixel_values" in inputs
    assert reply(
        tiny_llava, runner, GenerationSettings(max_new_tokens=4), image=render_text_image("hi")
    )
    with pytest.raises(ConfigError):
        GenerationSettings(temperature=-1)
    with pytest.raises(ValueError, match="end with a user message"):
        chat_inputs(tiny_llama, [{"role": "assistant", "content": "x"}])
    assert torch.is_tensor(chat_inputs(tiny_llama, HISTORY, system_prompt="Be brief.")["input_ids"])


def test_columns_stream_one_after_the_other_and_stop(tiny_llama, runner) -> None:
    jobs = [(v, HISTORY) for v in COLUMNS]
    v = _Variants(tiny_llama)
    done = [
        r
        for r in stream_columns(
            lambda: v, jobs, GenerationSettings(max_new_tokens=6), runner=runner
        )
        if r.done
    ]
    assert [r.variant for r in done] == list(COLUMNS) == v.used
    assert all(r.tokens == 6 and not r.stopped for r in done)
    assert done[0].text == done[1].text  # same weights, same seed: same answer

    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 4

    v = _Variants(tiny_llama)
    done = [
        r
        for r in stream_columns(
            lambda: v, jobs, GenerationSettings(max_new_tokens=500), runner=runner, should_stop=stop
        )
        if r.done
    ]
    assert [r.variant for r in done] == ["original"] and v.used == ["original"]
    assert done[0].stopped and done[0].tokens < 10

    before = set(threading.enumerate())
    tokens = {"n": 0}

    def count() -> bool:
        tokens["n"] += 1
        return False

    events = stream_columns(
        lambda: _Variants(tiny_llama),
        jobs,
        GenerationSettings(max_new_tokens=500),
        runner=runner,
        should_stop=count,
    )
    next(events)
    events.close()  # e.g. the browser went away: generation stops and close() waits for it
    n = tokens["n"]
    assert n < 50
    assert runner.call(lambda: tokens["n"]) == n  # the runner is idle: nothing generates on
    # no thread started here is still alive (other tests' threads may end meanwhile)
    assert set(threading.enumerate()) <= before


class _SimulatedTime:
    """Simulated time for ``stream_columns``: the model takes ``token_s`` per token on the
    producer's clock, each event is stamped with it when put, and the consumer's clock (what
    ``time.monotonic`` reads in ``hsr_core.chat``) jumps to an event's stamp when it takes it,
    or by the wait's timeout when the next event is later. The timing is then the same on a
    fast and on a loaded machine: no sleep, no real clock."""

    def __init__(self, token_s: float, pauses: dict[int, float] | None = None) -> None:
        self.token_s, self.producer_now, self.now = token_s, 0.0, 0.0
        self.pauses, self.tokens = pauses or {}, 0

    def token(self) -> bool:  # the stop check, once per token
        self.tokens += 1
        self.producer_now += self.pauses.get(self.tokens, self.token_s)
        return False

    def queue(self) -> _SimulatedQueue:
        return _SimulatedQueue(self)


class _SimulatedQueue:
    def __init__(self, sim: _SimulatedTime) -> None:
        self.sim, self.items, self.head, self.ended = sim, queue.Queue(), None, False

    def put(self, item) -> None:
        self.items.put((self.sim.producer_now, item))

    def _peek(self):  # waits (really) for the producer's next event; it always ends with None
        if self.head is None:
            self.head = self.items.get(timeout=120)
        return self.head

    def get(self, timeout: float | None = None):
        stamp, item = self._peek()
        if timeout is not None and stamp > self.sim.now + timeout:
            self.sim.now += timeout
            raise queue.Empty
        self.sim.now = max(self.sim.now, stamp)
        self.head, self.ended = None, item is None  # None: the producer's last event
        return item

    def get_nowait(self):
        return self.get(timeout=0.0)

    def empty(self) -> bool:
        return self.ended or self._peek()[0] > self.sim.now


def _streamed(
    tiny_llama, runner, monkeypatch, min_interval: float, token_s: float, tokens: int, pauses=None
):
    """``(simulated moment, event)`` of one streamed reply (token ``i`` takes ``pauses[i]``
    seconds where given)."""
    import hsr_core.chat as chat_mod

    sim = _SimulatedTime(token_s, pauses)
    with monkeypatch.context() as m:
        m.setattr(chat_mod, "queue", SimpleNamespace(Queue=sim.queue, Empty=queue.Empty))
        m.setattr(
            chat_mod,
            "time",
            SimpleNamespace(monotonic=lambda: sim.now, perf_counter=time.perf_counter),
        )
        jobs = [("original", [{"role": "user", "content": "Tell me a story."}])]
        return [
            (sim.now, r)
            for r in stream_columns(
                lambda: _Variants(tiny_llama),
                jobs,
                GenerationSettings(max_new_tokens=tokens),
                runner=runner,
                should_stop=sim.token,
                min_interval=min_interval,
            )
        ]


def test_streamed_text_is_throttled_but_never_lost(tiny_llama, runner, monkeypatch) -> None:
    every = [r for _, r in _streamed(tiny_llama, runner, monkeypatch, 0.0, 0.02, 40)]
    texts = [r.text for r in every if not r.done]
    final = every[-1]
    assert final.done and final.tokens == 40 and len(texts) >= 20
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))

    # 40 tokens of 20 ms: at most one text event per 100 ms, and the same final text
    timed = _streamed(tiny_llama, runner, monkeypatch, 0.1, 0.02, 40)
    moments = [t for t, r in timed if not r.done]
    assert len(texts) // 5 <= len(moments) < len(texts)
    assert all(b - a >= 0.1 - 1e-9 for a, b in zip(moments, moments[1:], strict=False))
    assert timed[-1][1].done and timed[-1][1].text == final.text
    assert all(final.text.startswith(r.text) for _, r in timed)

    # tokens slower than the interval: no text is held back (each is sent when it comes)
    slow = [r.text for _, r in _streamed(tiny_llama, runner, monkeypatch, 0.1, 0.15, 8)]
    each = [r.text for _, r in _streamed(tiny_llama, runner, monkeypatch, 0.0, 0.15, 8)]
    assert slow == each and len(each) > 2


def test_held_back_text_is_sent_when_the_interval_is_up(tiny_llama, runner, monkeypatch):
    """Fast tokens, then the model pauses for a second: the text held back is sent when the
    interval is up, not a second later with the next token (no text is older than 100 ms)."""
    pauses = {12: 1.0, 24: 1.0}
    arrivals = _streamed(tiny_llama, runner, monkeypatch, 0.0, 0.02, 30, pauses)
    shown = _streamed(tiny_llama, runner, monkeypatch, 0.1, 0.02, 30, pauses)
    assert arrivals[-1][1].text == shown[-1][1].text
    for came, r in arrivals:
        first = min(t for t, s in shown if s.text.startswith(r.text))
        assert first <= came + 0.1 + 1e-9, (came, first, r.text)


def test_turns_run_in_the_runner_they_are_given(tiny_llama, runner) -> None:
    where = []

    class Recording(_Variants):
        @contextmanager
        def use(self, name: str):
            where.append(threading.get_ident())
            yield self.loaded

    jobs = [(v, [{"role": "user", "content": "Hi"}]) for v in COLUMNS]
    list(
        stream_columns(
            lambda: Recording(tiny_llama), jobs, GenerationSettings(max_new_tokens=2), runner=runner
        )
    )
    assert where == [runner.ident()] * 3 and runner.ident() != threading.get_ident()
