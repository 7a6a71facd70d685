"""How a stage's report is written: JSON (every number), Markdown (the tables) and a PNG chart."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


def write_report_files(folder: Path, name: str, report: dict, markdown: str,
                       plot: Callable[[dict, Path], None]) -> list[Path]:
    """<name>.json, <name>.md and <name>.png into folder; returns the files written. A chart that
    fails to draw is logged and left out: the JSON has every number, and the PNG can be drawn from
    it again."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(report, indent=2))
    (folder / f"{name}.md").write_text(markdown)
    written = [folder / f"{name}.json", folder / f"{name}.md"]
    try:
        plot(report, folder / f"{name}.png")
    except Exception:  # noqa: BLE001 - e.g. a matplotlib without its fonts; the data is kept
        log.exception("%s.png could not be drawn", name)
    else:
        written.append(folder / f"{name}.png")
    return written
