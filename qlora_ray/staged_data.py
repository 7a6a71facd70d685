"""A tenant's staged rows (runs/<job>/data/<tenant>): the train stage writes them, validated, as
trained on; GPTQ calibration (the fuse stage and the naive-PTQ base) and the eval stage read them
back. One module owns the file names and the format, both ways.
"""

from __future__ import annotations

import json
from pathlib import Path

from qlora_ray.store import Store, data_key

TRAIN_FILE, EVAL_FILE = "train.jsonl", "eval.jsonl"


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def read_rows(path: Path) -> list[dict]:
    """The rows of a staged file on local disk."""
    text = path.read_text(encoding="utf-8")
    # "\n" only, as written: splitlines() would also cut a row at a U+2028, U+2029 or \x85 in its text
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def fetch_rows(store: Store, job: str, tenant: str, file_name: str, folder: Path) -> list[dict]:
    """One staged file's rows (TRAIN_FILE or EVAL_FILE), fetched into folder and verified on the way."""
    store.fetch(data_key(job, tenant), folder, only=[file_name])
    return read_rows(folder / file_name)
