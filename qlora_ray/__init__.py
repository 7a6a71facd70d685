"""qlora_ray: fine-tune one base model for many tenants on Ray; fuse and serve the results.

Importing the package sets process defaults every stage relies on (each only if unset):
- HF_HUB_OFFLINE / HF_DATASETS_OFFLINE: nothing is ever downloaded; without them a missing local
  file turns into ~45 s of hub retries before the real error;
- RAY_USAGE_STATS_ENABLED=0: no usage reporting from clusters we start;
- GPTQMODEL_CPU_WORKERS=2: GPTQModel's default of (cores+1)//2 workers fails on 2-core machines.
"""

import logging
import os

__version__ = "0.1.0"

for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "GPTQMODEL_CPU_WORKERS": "2",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)

# Harmless import-time noise from torch and torchao that would bury our own progress lines.
for _logger in ("torch.utils._pytree", "torchao"):
    logging.getLogger(_logger).setLevel(logging.ERROR)
