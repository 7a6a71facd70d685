"""Live status records: a heartbeat while a tenant trains, and "stale" for a writer that went silent."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import yaml

from qlora_ray.cli import main
from qlora_ray.store import Store, status_key
from qlora_ray.train import status as status_module
from qlora_ray.train.status import StatusWriter, is_stale


def test_a_running_record_keeps_beating_until_its_state_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(status_module, "HEARTBEAT_SECONDS", 0.05)
    store = Store(str(tmp_path / "store"))
    writes = []
    real = store.write_record
    monkeypatch.setattr(store, "write_record", lambda key, record: (writes.append(dict(record)), real(key, record)))
    writer = StatusWriter(store, "j", "a")
    writer.state("running", step=0)
    time.sleep(0.5)  # a model load: no step is logged, the record is written anyway
    beats = len(writes)
    assert beats >= 4 and all(w["state"] == "running" for w in writes)
    writer.state("done", step=10)
    time.sleep(0.3)
    assert len(writes) == beats + 1 and store.read_record(status_key("j", "a"))["state"] == "done"


def test_a_silent_running_record_is_stale():
    now = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)
    recent = {"state": "running", "updated_at": (now - timedelta(seconds=60)).isoformat()}
    silent = {"state": "running", "updated_at": (now - timedelta(minutes=20)).isoformat()}
    assert not is_stale(recent, now)
    assert is_stale(silent, now)
    assert not is_stale({**silent, "state": "failed"}, now)


def test_status_says_stale_for_a_tenant_whose_driver_was_killed(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    job = {"name": "j", "store": "store", "base": {"name": "tiny", "source": "shape:tiny"},
           "tenants": [{"id": "a", "train_data": "d.jsonl"}, {"id": "b", "train_data": "d.jsonl"}]}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    store = Store(str(tmp_path / "store"))
    long_ago = (datetime.now(timezone.utc) - timedelta(minutes=42)).isoformat(timespec="seconds")
    store.write_record(status_key("j", "a"), {"tenant": "a", "state": "running", "step": 7, "updated_at": long_ago})
    store.write_record(status_key("j", "b"), {"tenant": "b", "state": "running", "step": 3,
                                              "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    assert main(["status", str(tmp_path / "job.yaml")]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line[:2] in ("a ", "b ")}
    assert " stale " in lines["a"] and "no update for 42 min" in lines["a"] and "a rerun resumes it" in lines["a"]
    assert " running " in lines["b"]
