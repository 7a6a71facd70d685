"""The files of a PEFT adapter, and the check every stage makes before anything reads them.

Adapters reach the store from our train stage, but also from users who publish one trained
elsewhere, so their files are untrusted input. Only safetensors are ever read: peft falls back to
unpickling `adapter_model.bin` when no safetensors file is there, and unpickling can run any code.
peft has no switch to refuse that fallback, hence this check before every peft or safetensors load.
"""

from __future__ import annotations

import json
from pathlib import Path

from qlora_ray.errors import AdapterError

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def check_adapter_files(names: list[str], where: str) -> None:
    """Raise AdapterError unless the listed file names hold a safetensors adapter and its config."""
    pickles = sorted(name for name in names if name.endswith(PICKLE_SUFFIXES))
    if ADAPTER_WEIGHTS not in names:
        found = (f" (it holds {', '.join(pickles)}: pickle files are never loaded, they can run code; "
                 "save the adapter with safe_serialization=True)") if pickles else ""
        raise AdapterError(f"{where}: no {ADAPTER_WEIGHTS}{found}")
    if ADAPTER_CONFIG not in names:
        raise AdapterError(f"{where}: no {ADAPTER_CONFIG}")


def read_adapter_config(folder: Path) -> dict:
    """adapter_config.json as a dict; AdapterError when it is not a JSON object."""
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{ADAPTER_CONFIG}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{ADAPTER_CONFIG}: expected a JSON object (got {type(config).__name__})")
    return config


def checked_adapter_dir(folder: Path) -> Path:
    """The folder, once it holds a safetensors adapter (see check_adapter_files); for peft's loaders."""
    check_adapter_files(sorted(p.name for p in folder.iterdir()), str(folder))
    read_adapter_config(folder)
    return folder
