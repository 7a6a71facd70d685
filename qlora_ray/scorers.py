"""Exact-match scorers for a tenant's eval answers: pure functions (prediction, reference) -> bool.

Each is strict about content and lenient only about what carries no meaning for the task:
surrounding whitespace everywhere, key order in JSON, keyword case and spacing in SQL.
"""

from __future__ import annotations

import json
import re
from typing import Callable


def exact(prediction: str, reference: str) -> bool:
    """Identical after trimming surrounding whitespace."""
    return prediction.strip() == reference.strip()


def json_equal(prediction: str, reference: str) -> bool:
    """Both parse as JSON and denote the same value (key order and spacing do not matter)."""
    try:
        return json.loads(prediction.strip()) == json.loads(reference.strip())
    except ValueError:
        return False


_SQL_TOKEN = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\d+(?:\.\d+)?|\w+|[^\s\w]")


def _sql_tokens(text: str) -> list[str]:
    tokens = _SQL_TOKEN.findall(text.strip().rstrip(";").strip())
    # string literals keep their case; keywords and identifiers do not matter in SQLite
    return [t if t[0] in "'\"" else t.lower() for t in tokens]


def sql_equal(prediction: str, reference: str) -> bool:
    """The same SQL token sequence, ignoring keyword case, spacing and a trailing semicolon."""
    return _sql_tokens(prediction) == _sql_tokens(reference)


SCORERS: dict[str, Callable[[str, str], bool]] = {
    "exact": exact,
    "json": json_equal,
    "sql": sql_equal,
}
