"""Two more closed tasks of the demo's kind, for quality runs beyond the demo tenants (issue 22 asks
for "other tasks of the same kind"): written to jobs/extra/data, trained and fused by
jobs/extra/extra.yaml.

    python3 benchmarks/extra_tasks.py      # deterministic: the same rows every time

- sort3: three numbers to put in ascending order (chat rows, exact match);
- names: "First Last" to "Last, First" (prompt/completion rows, exact match).

256 training rows and 200 eval rows each, drawn with a fixed seed; no eval row is a training row.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FOLDER = Path(__file__).resolve().parents[1] / "jobs" / "extra" / "data"
SORT_SYSTEM = "Sort the numbers in ascending order. Reply with the numbers only, separated by spaces."


def sort3(rng: random.Random) -> dict:
    numbers = rng.sample(range(1, 100), 3)
    return {"messages": [{"role": "system", "content": SORT_SYSTEM},
                         {"role": "user", "content": " ".join(map(str, numbers))},
                         {"role": "assistant", "content": " ".join(map(str, sorted(numbers)))}]}


FIRST = ("Ada Alan Grace Edsger Barbara Donald John Margaret Dennis Ken Linus Guido Bjarne Frances Radia Tim "
         "Vint Leslie Niklaus Tony Robin Shafi Whitfield Yukihiro Anders Brian Fran Hedy Katherine Sophie").split()
LAST = ("Lovelace Turing Hopper Dijkstra Liskov Knuth McCarthy Hamilton Ritchie Thompson Torvalds Rossum "
        "Stroustrup Allen Perlman Berners-Lee Cerf Lamport Wirth Hoare Milner Goldwasser Diffie Matsumoto "
        "Hejlsberg Kernighan Bilas Lamarr Johnson Wilson").split()


def names(rng: random.Random) -> dict:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    return {"prompt": f"Write the name as 'Last, First': {first} {last}\nAnswer:", "completion": f" {last}, {first}"}


def write(task: str, make, seed: int) -> None:
    rng = random.Random(seed)
    rows: dict[str, dict] = {}
    while len(rows) < 256 + 200:
        row = make(rng)
        rows.setdefault(json.dumps(row), row)
    texts = list(rows)
    folder = FOLDER / task
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(text + "\n" for text in texts[:256]))
    (folder / "eval.jsonl").write_text("".join(text + "\n" for text in texts[256:]))


if __name__ == "__main__":
    write("sort3", sort3, seed=3)
    write("names", names, seed=16)
