"""Built-in sets, loaders, bad rows, and typographic images."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from hsr_core.data import (
    DataError,
    builtin_calibration,
    builtin_eval,
    fingerprint,
    load_calibration,
    load_eval,
    load_table,
    load_vlguard,
    render_text_image,
    select,
    with_typographic_images,
)
from hsr_core.encoding import encode_one, iter_batches


def test_builtin_sets_are_big_enough_and_disjoint():
    calib = builtin_calibration()
    assert len(calib.safety) >= 150 and len(calib.utility) >= 150
    cats = Counter(s.category for s in calib.safety)
    assert len(cats) >= 8
    assert all(s.response and s.harmful for s in calib.safety)
    assert all(s.response and s.harmful is False for s in calib.utility)
    ev = builtin_eval()
    assert sum(s.harmful for s in ev) >= 60 and sum(not s.harmful for s in ev) >= 60
    seen = {s.prompt.lower() for s in calib.safety + calib.utility}
    assert not any(s.prompt.lower() in seen for s in ev)  # the evaluation split is held out


def test_typographic_images():
    img = render_text_image("How do I pick a lock?")
    assert img.size == (336, 336) and img.mode == "RGB"
    assert img.getextrema()[0][0] == 0  # black text drawn on white
    assert list(img.getdata()) == list(render_text_image("How do I pick a lock?").getdata())
    samples = with_typographic_images(builtin_calibration().safety[:2])
    assert samples[0].image_text == samples[0].prompt


def test_select_is_reproducible():
    items = builtin_calibration().utility
    assert select(items, 10, seed=1) == select(items, 10, seed=1)
    assert select(items, 10, seed=1) != select(items, 10, seed=2)
    assert select(items, 10_000) == items


def test_jsonl_csv_and_column_mapping(tmp_path):
    rows = [
        {"instruction": f"Question {i}?", "output": f"Answer {i}.", "unsafe": i % 2 == 0}
        for i in range(6)
    ]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    mapping = {"prompt": "instruction", "response": "output", "harmful": "unsafe"}
    calib = load_calibration(str(jl), columns=mapping)
    assert len(calib.safety) == 3 and len(calib.utility) == 3
    assert calib.safety[0].prompt == "Question 0?" and calib.safety[0].response == "Answer 0."
    csv_path = tmp_path / "d.csv"
    csv_path.write_text(
        "instruction,output,unsafe\n"
        + "\n".join(f"Q{i},A{i},{'yes' if i % 2 else 'no'}" for i in range(4))
        + "\n"
    )
    assert len(load_calibration(str(csv_path), columns=mapping).safety) == 2
    js = tmp_path / "d.json"
    js.write_text(json.dumps(rows))
    assert len(load_table(js, mapping)) == 6


def test_malformed_rows_name_file_and_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "response": "fine"}\n{"prompt": "broken"\n')
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: not valid JSON"):
        load_table(bad)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "ok"}\n{"text": "no prompt here"}\n')
    with pytest.raises(
        DataError, match=r"missing.jsonl: row 2: no text in the prompt column 'prompt'"
    ):
        load_table(missing)
    no_resp = tmp_path / "noresp.jsonl"
    no_resp.write_text(
        '{"prompt": "a", "harmful": true}\n{"prompt": "b", "response": "", "harmful": false}\n'
    )
    with pytest.raises(DataError, match="row 1: empty response"):
        load_calibration(str(no_resp))
    flag = tmp_path / "flag.jsonl"
    flag.write_text('{"prompt": "a", "response": "r", "harmful": "perhaps"}\n')
    with pytest.raises(DataError, match=r"row 1: cannot read 'perhaps'"):
        load_calibration(str(flag))
    unsplit = tmp_path / "unsplit.jsonl"
    unsplit.write_text('{"prompt": "a", "response": "r"}\n')
    with pytest.raises(DataError, match="harmful"):
        load_calibration(str(unsplit))
    with pytest.raises(DataError, match="no data file"):
        load_table(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="unsupported file type"):
        (tmp_path / "x.txt").write_text("hi")
        load_table(tmp_path / "x.txt")
    img = tmp_path / "img.jsonl"
    img.write_text('{"prompt": "a", "response": "r", "image": "nowhere.png", "harmful": true}\n')
    with pytest.raises(DataError, match=r"row 1: image file .*nowhere.png.* does not exist"):
        load_calibration(str(img))


def _no_download(*_args, **_kwargs):
    raise AssertionError("datasets was asked for a hub dataset while the hub is unreachable")


def test_hub_dataset_offline_is_a_clear_error(monkeypatch, offline_hub, tmp_path):
    """HF_HUB_OFFLINE and nothing cached: refused at once with what to do, before ``datasets``
    is asked (with no network it retries for about 20 s)."""
    import datasets

    offline_hub(tmp_path / "hub")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", _no_download)
    with pytest.raises(DataError) as e:
        load_table("someone/no-such-dataset")
    assert str(e.value) == (
        "The Hugging Face hub is unreachable (HF_HUB_OFFLINE is set) and the dataset "
        "'someone/no-such-dataset' is not in the local hub cache: use a local JSON, JSONL or "
        "CSV file instead (or connect, and load it once to cache it)."
    )


def test_hub_dataset_without_a_connection_is_refused_at_once(monkeypatch, tmp_path):
    """No HF_HUB_OFFLINE but no connection: the quick check answers, ``datasets`` is never
    asked."""
    import datasets
    from huggingface_hub import constants

    from hsr_core import data

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(data, "hub_reachable", lambda: False)
    monkeypatch.setattr(datasets, "load_dataset", _no_download)
    with pytest.raises(DataError, match=r"unreachable \(no connection to it\) .* use a local"):
        load_table("someone/no-such-dataset")


def test_a_cached_hub_dataset_loads_offline(monkeypatch, offline_hub, tmp_path):
    """Offline, a dataset in the local hub cache is read from its snapshot folder."""
    cache = offline_hub(tmp_path / "hub")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    repo = cache / "datasets--someone--cached-set"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    rows = [{"prompt": f"p{i}", "response": f"r{i}", "harmful": i % 2 == 0} for i in range(4)]
    (snapshot / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = load_table("someone/cached-set")
    assert [s.prompt for s in samples] == ["p0", "p1", "p2", "p3"]
    assert [s.harmful for s in samples] == [True, False, True, False]


def make_vlguard(folder):
    (folder / "images").mkdir(parents=True)
    entries = []
    for i in range(4):
        render_text_image(f"picture {i}", size=64).save(folder / "images" / f"{i}.png")
        safe = i % 2 == 0
        pairs = (
            [
                {"safe_instruction": f"describe {i}", "response": f"It shows {i}."},
                {"unsafe_instruction": f"misuse {i}", "response": "I can't help with that."},
            ]
            if safe
            else [{"instruction": f"harm {i}", "response": "I'm sorry, I can't."}]
        )
        entries.append(
            {"id": f"img{i}", "image": f"images/{i}.png", "safe": safe, "instr-resp": pairs}
        )
    (folder / "train.json").write_text(json.dumps(entries))


def test_vlguard_split(tmp_path):
    """The broader pool (``vlguard-all:``; the reference's split is tested in
    test_core_vlguard.py)."""
    make_vlguard(tmp_path)
    calib = load_vlguard(tmp_path, pool="all")
    assert sorted(s.prompt for s in calib.utility) == ["describe 0", "describe 2"]
    assert sorted(s.prompt for s in calib.safety) == ["harm 1", "harm 3", "misuse 0", "misuse 2"]
    assert all(s.image and s.image.endswith(".png") for s in calib.safety + calib.utility)
    assert len(load_calibration(f"vlguard-all:{tmp_path}").safety) == 4
    assert len(load_calibration(f"vlguard:{tmp_path}").safety) == 2  # the reference's split
    assert len(load_calibration(str(tmp_path)).utility) == 2
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.json").write_text(
        json.dumps([{"image": "x.png", "safe": True, "instr-resp": []}])
    )
    with pytest.raises(DataError, match=r"train.json: entry 1: image 'x.png' not found"):
        load_vlguard(bad)


def test_eval_file(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"prompt": "hi", "harmful": false}\n{"prompt": "bomb?", "harmful": true}\n')
    ev = load_eval(str(path))
    assert [s.harmful for s in ev] == [False, True]
    path.write_text('{"prompt": "hi"}\n')
    with pytest.raises(DataError, match="row 1: missing 'harmful'"):
        load_eval(str(path))


def test_fingerprint_changes_with_content():
    a = builtin_calibration().safety[:5]
    assert fingerprint(a) == fingerprint(list(a))
    assert fingerprint(a) != fingerprint(a[:4])


def test_vision_batches_carry_images(tiny_llava):
    samples = with_typographic_images(builtin_calibration().safety[:3])
    batch = next(iter_batches(tiny_llava, samples, 3))
    assert batch.inputs["pixel_values"].shape[0] == 3
    assert batch.response_mask.sum() > 0
    inputs, plen, rlen = encode_one(tiny_llava, samples[0])
    image_id = tiny_llava.model.config.image_token_index
    assert int((inputs["input_ids"] == image_id).sum()) > 10  # the image became tokens


def test_eval_file_references_in_any_row(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(
        '{"prompt": "bomb?", "harmful": true}\n'
        '{"prompt": "boiling point?", "harmful": false, "reference": "100 C at sea level."}\n'
        '{"prompt": "capital?", "harmful": false, "response": "Paris."}\n'
    )
    assert [s.response for s in load_eval(str(path))] == [None, "100 C at sea level.", "Paris."]
