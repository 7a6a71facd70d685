"""Tenant data: JSONL rows in the two shapes TRL trains on, read from any fsspec URI and checked.

Accepted rows (one JSON object per line; every row of a file in the same shape):
- chat:               {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ..., assistant]}
- prompt-completion:  {"prompt": str, "completion": str}
- conversational p-c: {"prompt": [messages...], "completion": [assistant messages...]}

Problems are reported with the file and line (`data/sql/train.jsonl:12: ...`), up to MAX_REPORTED of
them, so a user fixes a bad file in one pass.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import fsspec

from qlora_ray.errors import DataError

ROLES = ("system", "user", "assistant")
MAX_REPORTED = 10
# Far above any tenant data set we expect; a guard against pointing train_data at the wrong file.
MAX_DATA_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class Dataset:
    """Validated rows of one data file."""

    uri: str
    format: str  # "chat" | "prompt-completion" | "conversational"
    rows: list[dict]
    sha256: str
    size: int


def read_rows(uri: str, storage_options: dict | None = None) -> Dataset:
    """Read and validate a JSONL data file. Raises DataError naming the file, line and problem."""
    raw = _read_bytes(uri, storage_options or {})
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{uri}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    rows: list[dict] = []
    problems: list[str] = []
    formats: dict[str, int] = {}
    # "\n" only: splitlines() would also cut rows at U+2028, U+2029 and \x85 inside JSON strings
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{uri}:{number}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        problem, shape = _check_row(row)
        if problem:
            problems.append(f"{uri}:{number}: {problem}")
            continue
        formats.setdefault(shape, number)
        rows.append(_keep_known_keys(row, shape))
    if len(formats) > 1:
        firsts = ", ".join(f"{shape} (first at line {line})" for shape, line in formats.items())
        problems.append(f"{uri}: rows mix formats: {firsts}; use one format per file")
    if problems:
        more = len(problems) - MAX_REPORTED
        shown = problems[:MAX_REPORTED] + ([f"... and {more} more problems"] if more > 0 else [])
        raise DataError("\n".join(shown))
    if not rows:
        raise DataError(f"{uri}: no rows (the file is empty)")
    return Dataset(uri=uri, format=next(iter(formats)), rows=rows, sha256=hashlib.sha256(raw).hexdigest(), size=len(raw))


def _read_bytes(uri: str, storage_options: dict) -> bytes:
    from qlora_ray.store import unsupported_scheme

    refused = unsupported_scheme(uri)
    if refused:
        raise DataError(f"{uri}: {refused}")
    try:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
        info = fs.info(path)
        if info.get("type") == "directory":
            raise DataError(f"{uri}: is a folder, not a JSONL file")
        if (info.get("size") or 0) > MAX_DATA_BYTES:
            raise DataError(f"{uri}: {info['size']:,} bytes is larger than the {MAX_DATA_BYTES:,}-byte limit")
        return fs.cat_file(path)
    except FileNotFoundError:
        raise DataError(f"{uri}: data file not found") from None
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any fsspec backend error becomes one message naming the file
        raise DataError(f"{uri}: cannot read: {type(exc).__name__}: {exc}") from None


def _check_row(row: Any) -> tuple[str | None, str]:
    if not isinstance(row, dict):
        return f"expected a JSON object per line (got {type(row).__name__})", ""
    if "messages" in row:
        return _check_messages(row["messages"], "messages", need_last_assistant=True), "chat"
    if "prompt" in row or "completion" in row:
        if "prompt" not in row or "completion" not in row:
            return "a prompt-completion row needs both 'prompt' and 'completion'", ""
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion.strip():
                return "'completion' is empty", ""
            return None, "prompt-completion"
        if isinstance(prompt, list) and isinstance(completion, list):
            problem = _check_messages(prompt, "prompt", need_last_assistant=False)
            problem = problem or _check_messages(completion, "completion", need_last_assistant=False)
            if not problem and any(m["role"] != "assistant" for m in completion):
                problem = "'completion' may hold only assistant messages"
            return problem, "conversational"
        return "'prompt' and 'completion' must both be strings or both be lists of messages", ""
    return f"unknown row format (keys: {', '.join(sorted(row)) or 'none'}); expected 'messages' or 'prompt'+'completion'", ""


def _check_messages(messages: Any, field: str, *, need_last_assistant: bool) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"'{field}' must be a non-empty list of messages"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "role" not in message:
            return f"'{field}[{i}]' must be an object with 'role' and 'content' only"
        if message["role"] not in ROLES:
            return f"'{field}[{i}].role' must be one of {', '.join(ROLES)} (got {message['role']!r})"
        if not isinstance(message.get("content"), str):
            return f"'{field}[{i}].content' must be a string"
    if need_last_assistant and messages[-1]["role"] != "assistant":
        return f"the last message of '{field}' must be the assistant's answer"
    return None


def _keep_known_keys(row: dict, shape: str) -> dict:
    """Drop extra columns (ids, metadata) so every row has the same schema for `datasets`."""
    return {"messages": row["messages"]} if shape == "chat" else {"prompt": row["prompt"], "completion": row["completion"]}


def prompt_and_reference(row: dict) -> tuple[list[dict] | str, str]:
    """Split an eval row into what the model is given and the answer it should produce.

    Chat rows give their messages up to the last (the assistant's answer); prompt-completion rows
    give the prompt as it is (a string for plain completion, a message list for conversational).
    """
    if "messages" in row:
        return row["messages"][:-1], row["messages"][-1]["content"]
    completion = row["completion"]
    reference = completion if isinstance(completion, str) else "".join(m["content"] for m in completion)
    return row["prompt"], reference
