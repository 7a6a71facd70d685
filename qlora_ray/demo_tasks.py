"""Deterministic data for the demo tenants: four tasks SmolLM2-135M cannot do out of the box.

Each task is a small, closed language that LoRA learns in a few dozen steps, with one right answer
per prompt so that exact match is a fair score:

- `sql`: a question about an `orders` table -> one SQLite query (chat rows, scorer `sql`);
- `dates`: a date written out in words -> ISO 8601 (chat rows, scorer `exact`);
- `kv2json`: `key: value; ...` text -> a JSON object with typed values (chat rows, scorer `json`);
- `units`: a unit conversion answered as `<number> <unit>` (plain prompt/completion rows, scorer `exact`).

Regenerate the files under jobs/data with `python -m qlora_ray.demo_tasks jobs/data`; a test checks
that the committed files are exactly what this module writes.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Callable

TRAIN_ROWS = 256
EVAL_ROWS = 50

CUSTOMERS = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "kim", "leo",
             "mallory", "nina", "oscar", "peggy", "quinn", "rupert", "sybil", "trent"]
PRODUCTS = ["laptop", "phone", "monitor", "keyboard", "mouse", "tablet", "camera", "printer", "speaker",
            "router", "charger", "headset"]
STATUSES = ["pending", "shipped", "delivered", "cancelled", "returned"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]

SQL_SYSTEM = ("Translate the question into one SQLite query over the table "
              "orders(id, customer, product, amount, status, created_on). Reply with the SQL only.")
DATES_SYSTEM = "Rewrite the date in ISO 8601 format (YYYY-MM-DD). Reply with the date only."
KV_SYSTEM = "Convert the key: value pairs into a JSON object. Numbers stay numbers. Reply with the JSON only."


def _chat(system: str, user: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]}


def sql_row(rng: random.Random) -> dict:
    kind = rng.randrange(7)
    customer, product, status = rng.choice(CUSTOMERS), rng.choice(PRODUCTS), rng.choice(STATUSES)
    amount = rng.randrange(50, 2000, 10)
    question, sql = [
        (f"How many orders are {status}?", f"SELECT COUNT(*) FROM orders WHERE status = '{status}';"),
        (f"What is the total amount spent by {customer}?",
         f"SELECT SUM(amount) FROM orders WHERE customer = '{customer}';"),
        (f"List the ids of orders above {amount} dollars.", f"SELECT id FROM orders WHERE amount > {amount};"),
        (f"Which products did {customer} order?", f"SELECT DISTINCT product FROM orders WHERE customer = '{customer}';"),
        (f"What is the average amount of {product} orders?",
         f"SELECT AVG(amount) FROM orders WHERE product = '{product}';"),
        (f"How many of {customer}'s orders are {status}?",
         f"SELECT COUNT(*) FROM orders WHERE customer = '{customer}' AND status = '{status}';"),
        (f"What is the largest {product} order?", f"SELECT MAX(amount) FROM orders WHERE product = '{product}';"),
    ][kind]
    return _chat(SQL_SYSTEM, question, sql)


def dates_row(rng: random.Random) -> dict:
    year, month = rng.randrange(1990, 2031), rng.randrange(12)
    day = rng.randrange(1, DAYS_IN_MONTH[month] + 1)
    name = MONTHS[month]
    written = rng.choice([f"{name} {day}, {year}", f"{day} {name} {year}", f"the {_ordinal(day)} of {name}, {year}"])
    return _chat(DATES_SYSTEM, written, f"{year:04d}-{month + 1:02d}-{day:02d}")


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


KV_FIELDS: dict[str, Callable[[random.Random], str | int]] = {
    "name": lambda rng: rng.choice(CUSTOMERS).capitalize(),
    "age": lambda rng: rng.randrange(18, 90),
    "city": lambda rng: rng.choice(["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Rome", "Austin"]),
    "product": lambda rng: rng.choice(PRODUCTS),
    "quantity": lambda rng: rng.randrange(1, 50),
    "status": lambda rng: rng.choice(STATUSES),
}


def kv2json_row(rng: random.Random) -> dict:
    keys = rng.sample(sorted(KV_FIELDS), rng.randrange(2, 5))
    values = {key: KV_FIELDS[key](rng) for key in keys}
    text = "; ".join(f"{key}: {value}" for key, value in values.items())
    return _chat(KV_SYSTEM, text, json.dumps(values))


CONVERSIONS = [("km", "m", 1000), ("kg", "g", 1000), ("m", "cm", 100), ("L", "mL", 1000), ("min", "s", 60)]


def units_row(rng: random.Random) -> dict:
    source, target, factor = rng.choice(CONVERSIONS)
    value = rng.randrange(1, 100)
    return {"prompt": f"Convert {value} {source} to {target}.\nAnswer:", "completion": f" {value * factor} {target}"}


TASKS: dict[str, tuple[Callable[[random.Random], dict], str]] = {
    "sql": (sql_row, "sql"),
    "dates": (dates_row, "exact"),
    "kv2json": (kv2json_row, "json"),
    "units": (units_row, "exact"),
}


def _prompt_key(row: dict) -> str:
    return json.dumps(row["messages"][:-1] if "messages" in row else row["prompt"])


def _held_out(task: str, key: str) -> bool:
    """About one prompt in six belongs to the eval split, decided by its hash: no prompt is in both."""
    return hashlib.sha256(f"{task}:{key}".encode()).digest()[0] < 43


def generate(task: str) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows for a task; eval prompts are distinct and never in train. Same on every run."""
    make_row = TASKS[task][0]
    rng = random.Random(f"qlora_ray-demo-{task}")
    train: list[dict] = []
    eval_rows: list[dict] = []
    eval_keys: set[str] = set()
    for _ in range(100_000):
        if len(train) >= TRAIN_ROWS and len(eval_rows) >= EVAL_ROWS:
            return train, eval_rows
        row = make_row(rng)
        key = _prompt_key(row)
        if not _held_out(task, key):
            if len(train) < TRAIN_ROWS:
                train.append(row)
        elif key not in eval_keys and len(eval_rows) < EVAL_ROWS:
            eval_keys.add(key)
            eval_rows.append(row)
    raise RuntimeError(f"task {task!r} cannot produce {EVAL_ROWS} distinct held-out prompts")


def write_all(out_dir: Path) -> list[Path]:
    """Write <out_dir>/<task>/{train,eval}.jsonl for every task; returns the files written."""
    written = []
    for task in TASKS:
        train, eval_rows = generate(task)
        for split, rows in (("train", train), ("eval", eval_rows)):
            path = out_dir / task / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
            written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "jobs/data")):
        print(written_path)
