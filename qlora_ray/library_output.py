"""Third-party output goes to a log file, so that a stage's terminal shows the product's own lines.

transformers, peft, bitsandbytes, TRL and GPTQModel's helpers speak through Python warnings and
logging (deprecation notices, "auto fixed pad_token_id", kernel advice) in every Ray worker, and
Ray forwards each line to the driver with its worker's prefix. Routed here, they land in one file
per node, `libraries_log()`, which the CLI names at the end of a run; nothing is dropped. Our own
progress lines are printed, not logged, so they still reach the terminal.

In a Ray worker, `route_library_output(worker=True)` also sends what libraries print to stdout
(GPTQModel's banner and kernel notices print, they do not log) to the file: the product's own lines
there go through `say`, to the process's real stdout, which Ray forwards to the driver. The CLI's
process keeps its stdout: the tables are printed there.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from qlora_ray.local_disk import local_root

LOG_NAME = "libraries.log"
_FORMAT = "%(asctime)s pid %(process)d %(name)s %(levelname)s: %(message)s"


def libraries_log() -> Path:
    """This node's log of third-party messages."""
    return local_root() / "logs" / LOG_NAME


def route_library_output(*, worker: bool = False) -> None:
    """Send Python warnings and third-party logging of this process to libraries_log(), and turn off
    the libraries' own progress bars; in a Ray worker (`worker`), what is printed to sys.stdout too.
    Idempotent."""
    path = libraries_log()
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if not any(getattr(handler, "baseFilename", None) == str(path) for handler in root.handlers):
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(handler)  # a library's later logging.basicConfig() finds a handler and adds none
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    warnings.simplefilter("default")  # each distinct warning once per place, as Python shows them by default
    _quiet_transformers()
    if worker and getattr(sys.stdout, "name", None) != str(path):
        sys.stdout = open(path, "a", encoding="utf-8", buffering=1)  # open for the process's lifetime


def say(line: str) -> None:
    """One of the product's own lines, from a Ray worker: to the real stdout, which Ray forwards."""
    print(line, file=sys.__stdout__, flush=True)


def _quiet_transformers() -> None:
    """transformers logs through a handler of its own, on stderr: its messages go to the root logger
    (the file) instead. Its and datasets' progress bars (loading, saving, mapping) are turned off."""
    import datasets
    import transformers

    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def gguf_reader_follows_progress_switch() -> None:
    """transformers' GGUF reader draws its bar with tqdm itself, past transformers' progress-bar
    switch: it is given transformers' own switched tqdm. Called where a GGUF is read (a base
    import), so that other processes do not import the reader (seconds) for nothing."""
    import transformers
    from transformers import modeling_gguf_pytorch_utils as gguf_reader

    gguf_reader.tqdm = transformers.utils.logging.tqdm
