"""Node-local disk: scratch folders that no dead process leaves behind, and a bounded cache of store files.

Every stage stages artifacts on local disk, because safetensors and `from_pretrained` need local
files. Plain temp folders go wrong on a shared node in two ways: a process killed mid-run (a lost
node, an OOM kill, a Ray retry) leaves its copy behind, and a cache kept across runs grows until the
disk is full. So all of it lives under one root per user and node:

    <root>/work/<prefix>--<host>--<pid>--<started>--<random>/   scratch of one live process
    <root>/cache/<entry>/                                       verified files of one artifact version
    <root>/locks/<entry>                                        the entry's lock; its mtime is its last use

- **Scratch** (`scratch_dir`): a folder named after the process that owns it. It is removed when the
  process is done with it; whenever a new one is made, those of this host's processes that are gone
  are removed too.
- **Cache** (`NodeCache`): one entry per artifact version, shared by every process of the node (the
  replicas and workers of one machine fetch a model once). A process fills an entry under the entry's
  exclusive lock and reads it under a shared one. Eviction takes the exclusive lock without waiting,
  so it never removes what a process is filling or reading. Least recently used entries go first,
  until the cache is within its budget.

The root is QLORA_RAY_LOCAL_DIR, by default `<temp dir>/qlora-ray-<uid>`: node-local, unlike a home
folder that may be shared over NFS, where process ids would mean nothing. The budget is
QLORA_RAY_CACHE_SIZE (default 50GB: room for about eight 8B models in 4 bits); an artifact larger
than the budget is still fetched, with everything else that is idle evicted first.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator

import psutil

from qlora_ray.spec import parse_size

LOCAL_DIR_ENV = "QLORA_RAY_LOCAL_DIR"
CACHE_SIZE_ENV = "QLORA_RAY_CACHE_SIZE"
DEFAULT_CACHE_SIZE = "50GB"
# Suffix of a file being downloaded; a cache entry's filler removes those a dead process left.
PARTIAL_SUFFIX = ".partial"

_SEP = "--"


def local_root() -> Path:
    configured = os.environ.get(LOCAL_DIR_ENV)
    return Path(configured) if configured else Path(tempfile.gettempdir()) / f"qlora-ray-{os.getuid()}"


# -- scratch ------------------------------------------------------------------------------------
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


def _started(pid: int) -> int:
    """A process's start time in centiseconds: with its pid, a name no later process can reuse."""
    return int(psutil.Process(pid).create_time() * 100)


def _is_alive(pid: int, started: int) -> bool:
    try:
        return abs(_started(pid) - started) <= 1
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # not ours to inspect (another user's): assume it lives
        return True


def process_identity() -> dict:
    """This process as a record can name it: host, pid and start time (centiseconds since the epoch)."""
    pid = os.getpid()
    return {"host": _host(), "pid": pid, "pid_started": _started(pid)}


def process_is_running(identity: dict) -> bool:
    """Whether the process a process_identity() names still runs (asked on its own host); True when
    the record is not one (it cannot be judged)."""
    pid, started = identity.get("pid"), identity.get("pid_started")
    if not (isinstance(pid, int) and isinstance(started, int)):
        return True
    return _is_alive(pid, started)


def sweep_scratch(root: Path | None = None) -> list[Path]:
    """Remove the scratch folders of this host's processes that are gone. Returns what was removed."""
    work = (root or local_root()) / "work"
    removed = []
    for folder in sorted(work.glob(f"*{_SEP}*")) if work.is_dir() else []:
        parts = folder.name.split(_SEP)
        if len(parts) != 5 or parts[1] != _host() or not (parts[2].isdigit() and parts[3].isdigit()):
            continue
        if not _is_alive(int(parts[2]), int(parts[3])):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@contextlib.contextmanager
def scratch_dir(prefix: str, root: Path | None = None) -> Iterator[Path]:
    """A new scratch folder owned by this process, removed on exit (and by the next process to make
    one here, if this one dies first)."""
    if _SEP in prefix or "/" in prefix:
        raise ValueError(f"scratch prefix {prefix!r} may not hold {_SEP!r} or '/'")
    work = (root or local_root()) / "work"
    work.mkdir(parents=True, exist_ok=True)
    sweep_scratch(root)
    pid = os.getpid()
    folder = work / _SEP.join([prefix, _host(), str(pid), str(_started(pid)), uuid.uuid4().hex[:8]])
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- cache --------------------------------------------------------------------------------------
def cache_entry_id(*parts: str) -> str:
    """The cache entry for one artifact version, e.g. (store URI, key, manifest digest)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


class NodeCache:
    """Verified store files shared by the processes of one node, within a disk budget (see the module
    docstring for the locking)."""

    def __init__(self, root: Path | None = None, budget_bytes: int | None = None):
        root = root or local_root()
        self.entries, self.locks, self.trash = root / "cache", root / "locks", root / "trash"
        for folder in (self.entries, self.locks, self.trash):
            folder.mkdir(parents=True, exist_ok=True)
        for doomed in self.trash.iterdir():  # an eviction cut short by a dead process
            shutil.rmtree(doomed, ignore_errors=True)
        self.budget = budget_bytes if budget_bytes is not None else parse_size(
            os.environ.get(CACHE_SIZE_ENV) or DEFAULT_CACHE_SIZE)

    @contextlib.contextmanager
    def checkout(self, entry: str, fill: Callable[[Path], None]) -> Iterator[Path]:
        """The entry's folder, after `fill(folder)` put what the caller needs there; nothing evicts it
        until the block ends. `fill` must place only verified files, each by an atomic rename, and
        should return at once for files already there."""
        with open(self.locks / entry, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            folder = self.entries / entry
            folder.mkdir(exist_ok=True)
            for leftover in folder.rglob(f"*{PARTIAL_SUFFIX}"):  # a download cut short by a dead process
                leftover.unlink(missing_ok=True)
            fill(folder)
            os.utime(self.locks / entry)  # last used: now
            # Shared from here; flock may release before it re-locks, so an eviction may slip in
            # between: fill again, which is quick when nothing went.
            fcntl.flock(lock, fcntl.LOCK_SH)
            folder.mkdir(exist_ok=True)
            fill(folder)
            self.evict(keep=entry)
            yield folder

    def size(self) -> int:
        return sum(_folder_bytes(folder) for folder in self.entries.iterdir())

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove idle entries, least recently used first, until the cache is within its budget.
        Entries in use are skipped. Returns the ids removed."""
        sizes = {folder.name: _folder_bytes(folder) for folder in self.entries.iterdir() if folder.is_dir()}
        total = sum(sizes.values())
        removed = []
        for entry in sorted(sizes, key=self._last_used):
            if total <= self.budget:
                break
            if entry == keep:
                continue
            with open(self.locks / entry, "a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # being filled or read
                doomed = self.trash / f"{entry}.{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(self.entries / entry, doomed)
                except FileNotFoundError:
                    continue  # another process evicted it first
                shutil.rmtree(doomed, ignore_errors=True)
            total -= sizes[entry]
            removed.append(entry)
        return removed

    def _last_used(self, entry: str) -> float:
        try:
            return (self.locks / entry).stat().st_mtime
        except FileNotFoundError:
            return 0.0


def _folder_bytes(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            if path.is_file():
                total += path.stat().st_size
    return total
