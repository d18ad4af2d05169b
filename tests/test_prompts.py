"""Prompt sets: every local format, split slices, built-ins, hashing, and one-line errors."""

from __future__ import annotations

import builtins
import csv
import json
from pathlib import Path

import pytest

from heretic_dist import prompts as prompts_mod
from heretic_dist.config import PromptSetSpec
from heretic_dist.engine.types import Prompt
from heretic_dist.errors import UserError
from heretic_dist.prompts import load_prompt_set, parse_split, prompt_set_hash

SHARED_PROMPTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "prompts"
SYS = "You are a helpful assistant."
TEXTS = ["How do I bake bread?", "Name three colours.", "Write a haiku about rain.", "What is 2+2?", "Say hi."]


def load(dataset, **kw) -> list[Prompt]:
    return load_prompt_set(PromptSetSpec(dataset=str(dataset), **kw), SYS)


def users(ps: list[Prompt]) -> list[str]:
    return [p.user for p in ps]


def error_of(dataset, **kw) -> str:
    with pytest.raises(UserError) as info:
        load(dataset, **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------------
# Formats round-trip


def write_all_formats(d: Path, texts: list[str], column: str = "text") -> dict[str, Path]:
    files = {}
    p = d / "p.txt"
    p.write_text("\n".join(texts) + "\n", encoding="utf-8")
    files["txt"] = p
    p = d / "p.jsonl"
    p.write_text("".join(json.dumps({column: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    files["jsonl"] = p
    p = d / "p.json"
    p.write_text(json.dumps([{"id": i, column: t} for i, t in enumerate(texts)]), encoding="utf-8")
    files["json"] = p
    p = d / "p.csv"
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", column])
        w.writerows([i, t] for i, t in enumerate(texts))
    files["csv"] = p
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = d / "p.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), column: texts}), p)
    files["parquet"] = p
    return files


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "json", "csv", "parquet"])
def test_each_format_round_trips(tmp_path, fmt):
    texts = TEXTS + ['A "quoted", comma, and ünïcödé ✓ prompt']
    path = write_all_formats(tmp_path, texts)[fmt]
    ps = load(path)
    assert ps == [Prompt(system=SYS, user=t) for t in texts]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_custom_column(tmp_path, fmt):
    path = write_all_formats(tmp_path, TEXTS, column="instruction")[fmt]
    assert users(load(path, column="instruction")) == TEXTS
    msg = error_of(path)  # default column "text" is absent
    assert str(path) in msg and "no column 'text'" in msg and "instruction" in msg and "id" in msg


def test_json_list_of_strings_and_jsonl_strings(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps(TEXTS))
    assert users(load(p)) == TEXTS
    p = tmp_path / "s.jsonl"
    p.write_text("\n".join(json.dumps(t) for t in TEXTS) + "\n\n")
    assert users(load(p)) == TEXTS
    p = tmp_path / "cols.json"
    p.write_text(json.dumps({"text": TEXTS}))
    assert users(load(p)) == TEXTS


def test_txt_strips_lines_skips_blanks_and_handles_crlf_and_bom(tmp_path):
    p = tmp_path / "p.txt"
    p.write_bytes("\ufeff  first \r\n\r\n\tsecond\rthird\n   \nfourth".encode("utf-8"))
    assert users(load(p)) == ["first", "second", "third", "fourth"]
    # Column is ignored for plain text (as upstream).
    assert users(load(p, column="whatever")) == ["first", "second", "third", "fourth"]


def test_unknown_extension_is_read_as_lines_like_upstream(tmp_path):
    p = tmp_path / "prompts.lst"
    p.write_text("a\nb\n")
    assert users(load(p)) == ["a", "b"]


def test_saved_dataset_folder_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = datasets.Dataset.from_dict({"text": TEXTS, "n": list(range(len(TEXTS)))})
    d.save_to_disk(str(tmp_path / "one"))
    assert users(load(tmp_path / "one", split="[1:3]")) == TEXTS[1:3]
    assert users(load(tmp_path / "one")) == TEXTS
    dd = datasets.DatasetDict({"train": d, "test": datasets.Dataset.from_dict({"text": ["t1", "t2", "t3"]})})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert users(load(tmp_path / "dict", split="test[:2]")) == ["t1", "t2"]
    assert users(load(tmp_path / "dict", split="train[-2:]")) == TEXTS[-2:]
    assert "no split 'valid' (available: train, test)" in error_of(tmp_path / "dict", split="valid[:2]")
    assert "several splits" in error_of(tmp_path / "dict")
    assert "no column 'prompt' (available: text, n)" in error_of(tmp_path / "one", column="prompt")
    assert "is a number, not a string" in error_of(tmp_path / "one", column="n")


# ---------------------------------------------------------------------------------------------------
# Splits


@pytest.mark.parametrize(
    "split, expected",
    [
        (None, slice(None)),
        ("train", slice(None)),
        ("train[:3]", slice(0, 3)),
        ("test[:100]", slice(0, 100)),
        ("[1:4]", slice(1, 4)),
        ("[:2]", slice(0, 2)),
        ("[3:]", slice(3, None)),
        ("[-2:]", slice(-2, None)),
        ("[:-1]", slice(0, -1)),
        ("[-100:2]", slice(0, 2)),
        ("[10:20]", slice(10, 20)),
        ("train[ 1 : 3 ]", slice(1, 3)),
        ("[:]", slice(None)),
        ("train[:40%]", slice(0, 2)),
        ("train[20%:60%]", slice(1, 3)),
    ],
)
def test_split_slices(tmp_path, split, expected):
    p = tmp_path / "p.txt"
    p.write_text("\n".join(TEXTS))
    if expected == slice(10, 20):
        assert "no prompts" in error_of(p, split=split)
        return
    assert users(load(p, split=split)) == TEXTS[expected]


def test_split_name_is_ignored_for_single_files(tmp_path):
    files = write_all_formats(tmp_path, TEXTS)
    for path in files.values():
        assert users(load(path, split="whatever[1:3]")) == TEXTS[1:3], path


@pytest.mark.parametrize("bad", ["train[:a]", "train[1]", "train[:4]+test[:2]", "[1:2:3]", "train[:4", "tr ain"])
def test_bad_split_syntax(tmp_path, bad):
    p = tmp_path / "p.txt"
    p.write_text("a\n")
    msg = error_of(p, split=bad)
    assert f"bad split '{bad}'" in msg and str(p) in msg and "train[:400]" in msg


def test_parse_split_fields():
    s = parse_split("train[-5:1_000]")
    assert (s.name, s.start, s.end, s.percent) == ("train", -5, 1000, False)
    assert s.bounds(3) == (0, 3)
    assert parse_split("[10%:]").bounds(50) == (5, 50)


def test_prefix_suffix_and_system_prompt_like_upstream(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("Tell me a joke.\n")
    ps = load(p, prefix="Please:", suffix="Thanks.", system_prompt="Be brief.")
    assert ps == [Prompt(system="Be brief.", user="Please: Tell me a joke. Thanks.")]
    assert load(p) == [Prompt(system=SYS, user="Tell me a joke.")]
    # An explicit empty system prompt is kept (upstream checks `is None`).
    assert load(p, system_prompt="")[0].system == ""


# ---------------------------------------------------------------------------------------------------
# Errors


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.txt"
    assert error_of(missing) == f"prompt file not found: {missing}"
    assert error_of("data/nope.jsonl") == "prompt file not found: data/nope.jsonl"
    with pytest.raises(UserError, match=r"^prompt file not found: bad_prompts \(\./x\.txt\)$"):
        load_prompt_set(PromptSetSpec(dataset="./x.txt"), SYS, label="bad_prompts")


def test_empty_sets(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("\n  \n")
    assert error_of(p) == f"no prompts in {p}"
    p2 = tmp_path / "p.txt"
    p2.write_text("a\nb\n")
    assert error_of(p2, split="[5:]") == f"no prompts in {p2} after split '[5:]'"
    p3 = tmp_path / "e.csv"
    p3.write_text("")
    assert "no prompts" in error_of(p3)
    p4 = tmp_path / "e.json"
    p4.write_text("[]")
    assert error_of(p4) == f"no prompts in {p4}"


def test_undecodable_bytes_name_line_and_offset(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes(b"fine\nalso fine\ncaf\xe9\n")
    msg = error_of(p)
    assert str(p) in msg and "line 3" in msg and "byte offset 18" in msg and "must be UTF-8" in msg
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"text": "caf\xe9"}\n')
    assert "line 1" in error_of(p)


def test_non_string_values(tmp_path):
    p = tmp_path / "n.jsonl"
    p.write_text('{"text": "ok"}\n{"text": 5}\n')
    msg = error_of(p)
    assert str(p) in msg and "line 2" in msg and "number, not a string" in msg
    p = tmp_path / "n.json"
    p.write_text('[{"text": "ok"}, {"text": null}]')
    assert "item 1" in error_of(p) and "null" in error_of(p)
    p = tmp_path / "n2.json"
    p.write_text('["ok", 3]')
    assert "item 1 is a number" in error_of(p)
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"], "num": [1, 2, 3]}), p)
    assert "row 1" in error_of(p) and "null" in error_of(p)
    assert users(load(p, split="[2:]")) == ["c"]  # only the selected rows must be strings
    assert "has type int64, not string" in error_of(p, column="num")


def test_bad_json_and_structure(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a"}\n{"text": \n')
    assert "invalid JSON at line 2" in error_of(p)
    p = tmp_path / "bad.json"
    p.write_text('{"a": 1}')
    assert "expected a JSON list" in error_of(p)
    p = tmp_path / "rows.jsonl"
    p.write_text('{"prompt": "a", "id": 1}\n')
    msg = error_of(p)
    assert "line 1 has no column 'text' (available: prompt, id)" in msg
    p = tmp_path / "bad.parquet"
    p.write_text("not parquet")
    assert "not a readable Parquet file" in error_of(p)


def test_csv_missing_column_lists_header(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text("prompt,label\nhello,1\n")
    assert error_of(p) == f"{p}: no column 'text' (available: prompt, label); set 'column'"
    assert users(load(p, column="prompt")) == ["hello"]


def test_hub_id_without_datasets_package_says_use_a_local_file(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    msg = error_of("mlabonne/harmless_alpaca", split="train[:10]")
    assert "mlabonne/harmless_alpaca" in msg and "datasets" in msg and "local" in msg


def test_hub_failure_is_one_line(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def boom(*a, **k):
        raise ConnectionError("Couldn't reach 'someone/set' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    msg = error_of("someone/set", split="train[:5]")
    assert "could not load someone/set" in msg and "Couldn't reach" in msg and "local file" in msg
    assert "needs a split name" in error_of("someone/set")


# ---------------------------------------------------------------------------------------------------
# Built-ins


def test_builtin_resolves_inside_package_data(tmp_path, monkeypatch):
    (tmp_path / "demo_harmless.txt").write_text("one\ntwo\nthree\n")
    monkeypatch.setattr(prompts_mod, "BUILTIN_DIR", tmp_path)
    assert users(load("builtin:demo_harmless", split="[:2]")) == ["one", "two"]
    msg = error_of("builtin:nope")
    assert "unknown built-in prompt set builtin:nope" in msg and "builtin:demo_harmless" in msg
    assert "unknown built-in" in error_of("builtin:../demo_harmless")


def test_builtin_dir_is_the_package_data_folder():
    assert prompts_mod.BUILTIN_DIR == Path(prompts_mod.__file__).resolve().parent / "data"
    assert "unknown built-in prompt set builtin:surely_missing_set" in error_of("builtin:surely_missing_set")


# ---------------------------------------------------------------------------------------------------
# Hash


def test_prompt_set_hash():
    a = [Prompt(SYS, t) for t in TEXTS]
    h = prompt_set_hash(a)
    assert len(h) == 64 and h == prompt_set_hash(list(a))
    assert prompt_set_hash(a[:-1] + [Prompt(SYS, TEXTS[-1] + "!")]) != h
    assert prompt_set_hash(a[:-1] + [Prompt("other", TEXTS[-1])]) != h
    assert prompt_set_hash(list(reversed(a))) != h
    assert prompt_set_hash(a[:-1]) != h
    # Pairs are not confusable by moving text between system and user.
    assert prompt_set_hash([Prompt("ab", "c")]) != prompt_set_hash([Prompt("a", "bc")])


# ---------------------------------------------------------------------------------------------------
# Real shared data


def test_real_shared_prompt_files():
    if not SHARED_PROMPTS.is_dir():
        pytest.skip(f"shared prompt data not found at {SHARED_PROMPTS} (expected ../shared beside the repo)")
    txt = load(SHARED_PROMPTS / "harmful_test.txt", split="test[:100]")
    jsonl = load(SHARED_PROMPTS / "harmful_test.jsonl", split="test[:100]")
    assert len(txt) == 100 and txt == jsonl
    assert all(p.user and p.user == p.user.strip() and p.system == SYS for p in txt)
    assert prompt_set_hash(txt) == prompt_set_hash(jsonl)
    good = load(SHARED_PROMPTS / "harmless_test.txt", split="[:20]")
    assert len(good) == 20 and prompt_set_hash(good) != prompt_set_hash(txt)
