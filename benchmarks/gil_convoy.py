"""How a thread that gives up the GIL often fares beside a busy one, at several GIL switch intervals.

A replica's step loop gives up the GIL at every CUDA call of a step (a launch, a graph replay, a
read-back) and must win it back each time. CPython makes a thread that wants the GIL wait until the
holder gives it up, at the latest after the switch interval (5 ms by default). Beside a busy thread
(a model loading: compiling, capturing, copying; an event loop carrying many streams), every one of
those waits can last the whole interval. The probe: a "step" of 20 calls that each give up the GIL
(as `time.sleep(0)` does), counted per second alone and beside a thread running pure Python, at each
interval; and the busy thread's own rate, for what the shorter intervals cost it.

    python benchmarks/gil_convoy.py --out OUT_DIR [--seconds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

INTERVALS_MS = [5.0, 1.0, 0.2, 0.1]
RELEASES_PER_STEP = 20


def step() -> None:
    for _ in range(RELEASES_PER_STEP):
        time.sleep(0)


def measure(interval_ms: float, busy_beside: bool, seconds: float) -> dict:
    """Steps per second of the stepper, and rounds per second of the busy thread (if any)."""
    sys.setswitchinterval(interval_ms / 1000)
    stop = threading.Event()
    counts = {"steps": 0, "busy_rounds": 0}

    def stepper():
        while not stop.is_set():
            step()
            counts["steps"] += 1

    def busy():
        while not stop.is_set():
            sum(i * i for i in range(1000))
            counts["busy_rounds"] += 1

    threads = [threading.Thread(target=stepper)] + ([threading.Thread(target=busy)] if busy_beside else [])
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return {"interval_ms": interval_ms, "busy_beside": busy_beside, "steps_per_s": round(counts["steps"] / seconds, 1),
            "busy_rounds_per_s": round(counts["busy_rounds"] / seconds, 1) if busy_beside else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    default = sys.getswitchinterval()
    rows = [measure(interval, beside, args.seconds) for interval in INTERVALS_MS for beside in (False, True)]
    sys.setswitchinterval(default)
    alone = {row["interval_ms"]: row["steps_per_s"] for row in rows if not row["busy_beside"]}
    lines = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
             f"{platform.python_version()}. {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. A step gives up the "
             f"GIL {RELEASES_PER_STEP} times; {args.seconds:g} s a row.", "",
             "| switch interval ms | steps/s alone | steps/s beside a busy thread | share kept | busy thread's rounds/s |",
             "|---|---|---|---|---|"]
    for row in rows:
        if row["busy_beside"]:
            base = alone[row["interval_ms"]]
            lines.append(f"| {row['interval_ms']:g} | {base} | {row['steps_per_s']} | "
                         f"{row['steps_per_s'] / base:.0%} | {row['busy_rounds_per_s']} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gil_convoy.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))
    (args.out / "gil_convoy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
