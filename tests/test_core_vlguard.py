"""The VLGuard split against the reference's rule, written out here from the HSR release's
``data_process/get_data.py`` (TheShineyue/HSR, commit f1932f1aea67): ``train_unsafes`` is every
entry with ``safe == False``, its first instruction-response pair; ``train_safe_safes`` every
entry with ``safe == True``, the first pair that has a ``safe_instruction``.
"""

from __future__ import annotations

import json
import random

import pytest

from hsr_core.data import DataError, load_calibration, load_vlguard, render_text_image


def reference_load_data(all_questions, subset):
    """``load_data`` of get_data.py, as released (reading from a list instead of train.json)."""
    new_item = []
    if subset == "unsafes":
        all_questions = [q for q in all_questions if q["safe"] == False]  # noqa: E712
        for question in all_questions:
            item = {}
            item["id"] = question["id"]
            item["question"] = question["instr-resp"][0]["instruction"]
            item["response"] = question["instr-resp"][0]["response"]
            item["image"] = question["image"]
            new_item.append(item)
    else:
        all_questions = [q for q in all_questions if q["safe"] == True]  # noqa: E712
        key = "unsafe_instruction" if subset == "safe_unsafes" else "safe_instruction"
        for question in all_questions:
            item = {}
            question = dict(question)
            question["question"] = next((q[key] for q in question["instr-resp"] if key in q), None)
            question["response"] = next(
                (q["response"] for q in question["instr-resp"] if key in q), None
            )
            item["id"] = question["id"]
            item["question"] = question["question"]
            item["response"] = question["response"]
            item["image"] = question["image"]
            new_item.append(item)
    return new_item


def synthetic_vlguard(folder, n=24, seed=0):
    """A VLGuard-shaped ``train.json``: unsafe images with one to three pairs (``instruction``),
    safe images with a safe and an unsafe instruction in either order."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True)
    entries = []
    for i in range(n):
        render_text_image(f"picture {i}", size=32).save(folder / "images" / f"{i}.png")
        safe = rng.random() < 0.5
        if safe:
            pairs = [
                {"safe_instruction": f"describe {i}", "response": f"It shows {i}."},
                {"unsafe_instruction": f"misuse {i}", "response": f"No, not {i}."},
            ]
            if rng.random() < 0.5:
                pairs.reverse()
        else:
            pairs = [
                {"instruction": f"harm {i}.{j}", "response": f"I can't, {i}.{j}."}
                for j in range(rng.randint(1, 3))
            ]
        entries.append(
            {"id": f"img{i}", "image": f"images/{i}.png", "safe": safe, "instr-resp": pairs}
        )
    (folder / "train.json").write_text(json.dumps(entries))
    return entries


def test_default_split_is_the_references(tmp_path):
    entries = synthetic_vlguard(tmp_path)
    calib = load_vlguard(tmp_path)
    unsafes = reference_load_data(entries, "unsafes")
    safe_safes = reference_load_data(entries, "safe_safes")
    assert [(s.prompt, s.response) for s in calib.safety] == [
        (q["question"], q["response"]) for q in unsafes
    ]
    assert [(s.prompt, s.response) for s in calib.utility] == [
        (q["question"], q["response"]) for q in safe_safes
    ]
    assert [s.image.split("/")[-1] for s in calib.safety] == [
        q["image"].split("/")[-1] for q in unsafes
    ]
    assert all(s.harmful for s in calib.safety) and not any(s.harmful for s in calib.utility)
    multi = sum(len(e["instr-resp"]) for e in entries if not e["safe"])
    assert multi > len(calib.safety)  # the synthetic set has unsafe images with several pairs
    assert "reference split" in calib.source
    ref = load_calibration(f"vlguard:{tmp_path}")
    assert [s.prompt for s in ref.safety] == [s.prompt for s in calib.safety]


def test_the_broader_pool_is_a_named_option(tmp_path):
    entries = synthetic_vlguard(tmp_path)
    pool = load_calibration(f"vlguard-all:{tmp_path}")
    expected = [ir["instruction"] for e in entries if not e["safe"] for ir in e["instr-resp"]] + [
        ir["unsafe_instruction"]
        for e in entries
        if e["safe"]
        for ir in e["instr-resp"]
        if "unsafe_instruction" in ir
    ]
    assert sorted(s.prompt for s in pool.safety) == sorted(expected)
    assert [s.prompt for s in pool.utility] == [s.prompt for s in load_vlguard(tmp_path).utility]
    assert "all pairs" in pool.source
    with pytest.raises(DataError, match="unknown VLGuard pool"):
        load_vlguard(tmp_path, pool="most")


def test_unsafe_entry_without_instruction_is_named(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    render_text_image("x", size=16).save(tmp_path / "a.png")
    (tmp_path / "train.json").write_text(
        json.dumps(
            [{"id": "u", "image": "a.png", "safe": False, "instr-resp": [{"response": "no"}]}]
        )
    )
    with pytest.raises(DataError, match="entry 1, instr-resp 0: no 'instruction' key"):
        load_vlguard(tmp_path)
