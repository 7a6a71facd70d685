"""The quick tier: no Ray cluster, no real model, about a minute on 2 cores. A test that needs a
cluster belongs in tests/ (the integration tier)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_ray_cluster(monkeypatch):
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("a quick-tier test started Ray: move it to tests/ (the integration tier)")

    monkeypatch.setattr(ray, "init", refuse)
