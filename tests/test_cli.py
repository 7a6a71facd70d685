"""The qlora-ray command: help, exit codes, one clear message and no traceback for bad input."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora_ray.cli import main
from qlora_ray.spec import load_spec
from tests.conftest import REPO

VERBS = ["validate", "base", "train", "fuse", "eval", "serve", "keys", "bench", "run", "status"]


@pytest.mark.parametrize("path", sorted((REPO / "jobs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_file_validates_with_its_data(path, capsys):
    load_spec(path)
    assert main(["validate", str(path), "--no-store"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(": ok")


def test_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert all(verb in out for verb in VERBS)
    assert "ray job submit" in out


@pytest.mark.parametrize("verb", VERBS)
def test_each_verb_has_useful_help(verb, capsys):
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    assert len(capsys.readouterr().out.splitlines()) >= 4


def test_validate_reports_data_problems(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p"}\n')
    job = {"name": "j", "store": "store", "base": {"name": "tiny", "source": "shape:tiny"},
           "tenants": [{"id": "a", "train_data": "bad.jsonl"}, {"id": "b", "train_data": "missing.jsonl"}]}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["validate", str(tmp_path / "job.yaml")]) == 1
    err = capsys.readouterr().err
    assert "2 problem(s)" in err
    assert "tenant a: train data: " in err and "bad.jsonl:1: a prompt-completion row needs both" in err
    assert "tenant b: train data: " in err and "missing.jsonl: data file not found" in err


def test_validate_checks_gptq_group_size_against_the_imported_base(tiny_store, tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    job = {"name": "j", "store": tiny_store.uri, "base": {"name": "tiny", "source": "shape:tiny"},
           "tenants": [{"id": "a", "train_data": "d.jsonl"}],
           "fuse": {"schemes": ["gptq-int4"], "gptq": {"group_size": 256}}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["validate", str(tmp_path / "job.yaml")]) == 1
    assert "fuse.gptq.group_size: 256 does not divide the layer width(s) [64, 128] of base 'tiny'; 64 fits" in capsys.readouterr().err


def test_base_import_via_the_cli_and_list(tmp_path, capsys):
    store = str(tmp_path / "store")
    assert main(["base", "import", "shape:tiny", "--name", "tiny", "--store", store, "--shard-size", "100KB"]) == 0
    assert main(["base", "list", "--store", store]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "shape:tiny" in out


def test_base_import_argument_errors(tmp_path, capsys):
    assert main(["base", "import", "shape:tiny", "--name", "tiny"]) == 1
    assert "missing --store" in capsys.readouterr().err
    assert main(["base", "import", "shape:tiny", "--name", "Bad/Name", "--store", str(tmp_path)]) == 1
    assert "--name must be lower-case" in capsys.readouterr().err


def test_run_and_status_on_a_tiny_job(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    job = {"name": "j", "store": "store", "base": {"name": "tiny", "source": "shape:tiny"},
           "tenants": [{"id": "a", "train_data": "d.jsonl"}]}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["validate", str(tmp_path / "job.yaml")]) == 0
    assert main(["status", str(tmp_path / "job.yaml")]) == 0
    assert "a       pending" in capsys.readouterr().out
    # As a user runs it, in a process of its own: what reaches the terminal is checked too.
    result = run_cli("run", "job.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "base tiny from shape:tiny: in the store" in out
    assert re.search(r"stages done: base [\d.]+ s, train [\d.]+ s, fuse [\d.]+ s, eval [\d.]+ s\.", out) and "qlora-ray serve" in out
    assert "eval a: skipped: no eval_data in the job file" in result.stderr
    # the training task's own progress line, forwarded by Ray without its "(train:a pid=…)" prefix
    assert re.search(r"^train a: step 1/\d+", out, re.MULTILINE), out
    assert "pid=" not in out + result.stderr, out + result.stderr
    assert (tmp_path / "store" / "bases" / "tiny" / "_SUCCESS").exists()
    assert (tmp_path / "store" / "runs" / "j" / "adapters" / "a" / "_SUCCESS").exists()
    for variant in ("bf16.original", "nf4.original"):  # the default fuse schemes
        assert (tmp_path / "store" / "runs" / "j" / "fused" / "a" / variant / "_SUCCESS").exists()
    assert main(["status", str(tmp_path / "job.yaml")]) == 0
    status = capsys.readouterr().out
    assert "a       done" in status and "2/2" in status


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlora_ray", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["validate", "missing.yaml"], "error: missing.yaml: job file not found"),
        (["base", "import", "nowhere", "--name", "b", "--store", "store"], "/nowhere: no such file or folder"),
        (["base", "import", "notes.txt", "--name", "b", "--store", "store"], "not a GGUF file"),
    ],
)
def test_bad_input_gets_one_message_and_no_traceback(tmp_path, args, expected):
    (tmp_path / "notes.txt").write_text("just text")
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "store" / "bases" / "b").exists()


@pytest.mark.parametrize("config", sorted((REPO / "serve").glob("*.yaml")), ids=lambda p: p.name)
def test_serve_configs_build_their_application(config, monkeypatch):
    import importlib

    monkeypatch.chdir(REPO)  # serve run is started from the repo root
    for app in yaml.safe_load(config.read_text())["applications"]:
        module, _, attribute = app["import_path"].partition(":")
        assert getattr(importlib.import_module(module), attribute)(app["args"]) is not None
