"""Third-party output goes to the node's log file; the product's own lines reach the terminal."""

from __future__ import annotations

import os
import subprocess
import sys

WORKER = """
import logging, warnings
from qlora_ray.library_output import route_library_output, say
route_library_output(worker=True)
warnings.warn("a library's deprecation", FutureWarning)
logging.getLogger("tokenicer").info("auto fixed pad_token_id")
import transformers
transformers.utils.logging.get_logger("transformers.x").warning("loss_type unrecognized")
print("GPT-QModel banner")
from qlora_ray.library_output import gguf_reader_follows_progress_switch
gguf_reader_follows_progress_switch()  # as a base import does before it reads a GGUF
from transformers import modeling_gguf_pytorch_utils
for _ in modeling_gguf_pytorch_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
    pass
say("eval a: base: accuracy 50.0%")
"""


def test_a_worker_says_its_own_lines_and_logs_the_libraries(tmp_path):
    done = subprocess.run([sys.executable, "-c", WORKER], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "QLORA_RAY_LOCAL_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "eval a: base: accuracy 50.0%\n"
    assert done.stderr == ""
    log = (tmp_path / "logs" / "libraries.log").read_text()
    for message in ("FutureWarning: a library's deprecation", "tokenicer INFO: auto fixed pad_token_id",
                    "loss_type unrecognized", "GPT-QModel banner"):
        assert message in log, message
    assert "eval a: base" not in log


def test_the_cli_process_keeps_its_stdout(tmp_path):
    script = "from qlora_ray.library_output import route_library_output\nroute_library_output()\nprint('table')\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "QLORA_RAY_LOCAL_DIR": str(tmp_path)})
    assert (done.returncode, done.stdout) == (0, "table\n"), done.stderr
