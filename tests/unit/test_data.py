"""Tenant data files: the accepted shapes, and a clear file:line message for each bad one."""

from __future__ import annotations

import json

import pytest

from qlora_ray.data import prompt_and_reference, read_rows
from qlora_ray.errors import DataError

CHAT = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                     {"role": "assistant", "content": "a"}]}
PLAIN = {"prompt": "Convert 1 km to m.\nAnswer:", "completion": " 1000 m"}
CONVERSATIONAL = {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}


def write(tmp_path, lines: list, name="data.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


@pytest.mark.parametrize("row, shape", [(CHAT, "chat"), (PLAIN, "prompt-completion"), (CONVERSATIONAL, "conversational")])
def test_accepted_shapes(tmp_path, row, shape):
    dataset = read_rows(write(tmp_path, [row, row, ""]))  # blank lines are skipped
    assert dataset.format == shape and len(dataset.rows) == 2
    assert len(dataset.sha256) == 64


def test_extra_columns_are_dropped(tmp_path):
    dataset = read_rows(write(tmp_path, [{**PLAIN, "id": 7}]))
    assert dataset.rows == [PLAIN]


def test_prompt_and_reference():
    assert prompt_and_reference(CHAT) == (CHAT["messages"][:2], "a")
    assert prompt_and_reference(PLAIN) == (PLAIN["prompt"], " 1000 m")
    assert prompt_and_reference(CONVERSATIONAL) == (CONVERSATIONAL["prompt"], "a")


@pytest.mark.parametrize(
    "line, expected",
    [
        ("{not json", ":2: not valid JSON"),
        ("[1, 2]", ":2: expected a JSON object per line (got list)"),
        ({"text": "hello"}, ":2: unknown row format (keys: text)"),
        ({"prompt": "p"}, ":2: a prompt-completion row needs both"),
        ({"prompt": "p", "completion": "  "}, ":2: 'completion' is empty"),
        ({"prompt": "p", "completion": ["a"]}, "must both be strings or both be lists"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "user", "content": "q"}]}, "last message of 'messages' must be the assistant's answer"),
        ({"messages": [{"role": "robot", "content": "q"}]}, "'messages[0].role' must be one of system, user, assistant"),
        ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}, "'messages[0].content' must be a string"),
        ({"messages": [{"role": "assistant", "content": "a", "name": "x"}]}, "must be an object with 'role' and 'content' only"),
        ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
         "'completion' may hold only assistant messages"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, line, expected):
    path = write(tmp_path, [CHAT, line])
    with pytest.raises(DataError) as caught:
        read_rows(path)
    assert str(caught.value).startswith(path)
    assert expected in str(caught.value)


def test_mixed_formats(tmp_path):
    with pytest.raises(DataError, match=r"rows mix formats: chat \(first at line 1\), prompt-completion \(first at line 2\)"):
        read_rows(write(tmp_path, [CHAT, PLAIN]))


def test_many_problems_are_capped(tmp_path):
    with pytest.raises(DataError) as caught:
        read_rows(write(tmp_path, ["{bad"] * 25))
    lines = str(caught.value).splitlines()
    assert len(lines) == 11 and lines[-1] == "... and 15 more problems"


def test_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="no rows"):
        read_rows(write(tmp_path, [], name="empty.jsonl"))
    with pytest.raises(DataError, match="is a folder"):
        read_rows(str(tmp_path))
    binary = tmp_path / "latin1.jsonl"
    binary.write_bytes(json.dumps(PLAIN).encode() + b"\n" + b'{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not UTF-8"):
        read_rows(str(binary))


def test_a_file_over_the_size_limit_is_refused(tmp_path, monkeypatch):
    import qlora_ray.data as data

    monkeypatch.setattr(data, "MAX_DATA_BYTES", 100)
    with pytest.raises(DataError, match="larger than the 100-byte limit"):
        read_rows(write(tmp_path, [CHAT, CHAT]))


def test_reads_from_s3(s3_bucket, tmp_path):
    import boto3

    boto3.client("s3").put_object(Bucket=s3_bucket, Key="data/t.jsonl", Body=(json.dumps(PLAIN) + "\n").encode())
    assert read_rows(f"s3://{s3_bucket}/data/t.jsonl").rows == [PLAIN]
    with pytest.raises(DataError, match="data file not found"):
        read_rows(f"s3://{s3_bucket}/data/missing.jsonl")


def test_line_separators_inside_strings_do_not_split_rows(tmp_path):
    row = {"prompt": "a\u2028b\u2029c\x85d", "completion": "e"}
    path = tmp_path / "seps.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_rows(str(path)).rows == [row]


def test_staged_rows_read_back_as_written_whatever_line_separators_their_text_holds(tmp_path):
    """Staged rows keep their text as UTF-8 (ensure_ascii=False): a U+2028, U+2029 or \\x85 inside an
    answer is a character of the row, not a line break, for every stage that reads them back."""
    from qlora_ray.staged_data import TRAIN_FILE, fetch_rows, write_rows
    from qlora_ray.store import Store, data_key

    rows = [{"prompt": "a\u2028b", "completion": "c\u2029d\x85e"}, {"prompt": "é", "completion": "ü"}]
    (tmp_path / "staged").mkdir()
    write_rows(tmp_path / "staged" / TRAIN_FILE, rows)
    store = Store(str(tmp_path / "store"))
    store.publish(data_key("j", "t"), tmp_path / "staged", kind="data", inputs={})
    assert fetch_rows(store, "j", "t", TRAIN_FILE, tmp_path / "read") == rows
