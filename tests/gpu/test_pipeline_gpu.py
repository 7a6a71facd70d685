"""The whole pipeline on a GPU, as `benchmarks/gpu_pipeline.py` runs it, at a smaller size: the
tiny base, two tenants, every scheme and both merge bases through `qlora-ray run`, then
`qlora-ray bench` through Ray Serve on one model of each scheme and the unmerged baseline.

Skipped without a CUDA GPU (CI has none); run on the lent H200 with `python -m pytest tests/gpu`
(with the packages of `bash .whl/install.sh` on PYTHONPATH).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_the_pipeline_runs_every_stage_and_serves_every_scheme(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_pipeline.py"), "--out", str(out),
                             "--work", str(tmp_path / "work"), "--shape", "tiny", "--no-install",
                             "--bench-seconds", "2"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    report = json.loads((out / "pipeline.json").read_text())
    assert set(report["stages"]) == {"base", "train", "fuse", "eval"}
    for tenant in ("dates", "kv2json"):
        names = [row["name"] for row in report["eval"][tenant]["rows"]]
        fused = [name for name in names if name.split(".")[0] in ("bf16", "nf4", "gptq-int4")]
        assert len(fused) == 6, names
    rows = report["bench"]["rows"]
    assert {row["model"] for row in rows} == {f"dates/{v}" for v in ("bf16.original", "nf4.original",
                                                                      "gptq-int4.original", "unmerged")}
    assert all(row["errors"] == 0 and row["requests"] > 0 for row in rows), rows
    assert report["kernel_build"]["exit"] == 0
