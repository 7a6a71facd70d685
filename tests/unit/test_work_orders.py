"""What the stages send their Ray tasks and actors (work_orders.py): what each worker needs of the job,
and no more, so an order's size does not grow with the job's tenants."""

from __future__ import annotations

import pickle

import pytest

from qlora_ray.store import Store
from qlora_ray.work_orders import EvalOrder, GptqOrder, StoreAddress, TrainOrder
from tests.helpers import fuse_spec


def spec_with(tmp_path, tenants: int, **fuse):
    folder = tmp_path / f"{tenants}-tenants"
    folder.mkdir()
    return fuse_spec(folder, Store(str(tmp_path / "store")), [f"tenant{i}" for i in range(tenants)], **fuse)


@pytest.mark.parametrize("make", [lambda spec: TrainOrder.of(spec, "tenant1"),
                                  lambda spec: EvalOrder.of(spec, "tenant1"),
                                  GptqOrder.of], ids=["train", "eval", "gptq"])
def test_an_order_is_as_large_for_a_job_of_fifty_tenants_as_for_two(tmp_path, make):
    small, large = spec_with(tmp_path, 2), spec_with(tmp_path, 50)
    assert len(pickle.dumps(make(large))) == len(pickle.dumps(make(small)))
    assert len(pickle.dumps(make(large))) < len(pickle.dumps(large)) / 5


def test_orders_carry_the_settings_their_workers_read(tmp_path):
    spec = spec_with(tmp_path, 2, schemes=["bf16", "gptq-int4"], merge_base="both", gptq={"group_size": 32})
    train = TrainOrder.of(spec, "tenant1")
    assert (train.job, train.base, train.tenant, train.spec_sha256) == ("t", "tiny", spec.tenant("tenant1"), spec.spec_hash())
    evaluation = EvalOrder.of(spec, "tenant0")
    assert evaluation.fused_variants == tuple(spec.fused_variants(spec.tenant("tenant0")))
    assert evaluation.naive_ptq and evaluation.batch_size == spec.eval.batch_size
    assert not EvalOrder.of(spec_with(tmp_path, 1), "tenant0").naive_ptq  # no gptq-int4 in the job
    assert GptqOrder.of(spec).gptq.group_size == 32


def test_a_worker_opens_the_store_the_job_names(tmp_path):
    spec = spec_with(tmp_path, 1)
    address = StoreAddress.of(spec)
    assert address.open().uri == Store(spec.store, spec.storage_options).uri
