"""The demo tenants' data generator and the exact-match scorers."""

from __future__ import annotations

import json

import pytest

from qlora_ray.data import prompt_and_reference, read_rows
from qlora_ray.demo_tasks import EVAL_ROWS, TASKS, TRAIN_ROWS, generate, write_all
from qlora_ray.scorers import SCORERS, exact, json_equal, sql_equal
from tests.conftest import REPO


def test_committed_data_is_what_the_generator_writes(tmp_path):
    written = write_all(tmp_path)
    assert len(written) == 2 * len(TASKS)
    for path in written:
        committed = REPO / "jobs" / "data" / path.relative_to(tmp_path)
        assert committed.read_bytes() == path.read_bytes(), f"{committed} is stale: python -m qlora_ray.demo_tasks jobs/data"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_splits_are_disjoint_and_sized(task):
    train, eval_rows = generate(task)
    assert len(train) == TRAIN_ROWS and len(eval_rows) == EVAL_ROWS
    prompt = lambda row: json.dumps(prompt_and_reference(row)[0])  # noqa: E731
    eval_prompts = [prompt(r) for r in eval_rows]
    assert len(set(eval_prompts)) == EVAL_ROWS
    assert not set(eval_prompts) & {prompt(r) for r in train}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_reference_scores_against_itself_and_not_against_others(task):
    scorer = SCORERS[TASKS[task][1]]
    _, eval_rows = generate(task)
    references = [prompt_and_reference(row)[1] for row in eval_rows]
    assert all(scorer(ref, ref) for ref in references)
    distinct = sorted(set(references))
    mismatches = sum(scorer(a, b) for a, b in zip(distinct, distinct[1:]))
    assert mismatches == 0


@pytest.mark.parametrize("task", sorted(TASKS))
def test_committed_files_are_valid_tenant_data(task):
    for split in ("train", "eval"):
        dataset = read_rows(str(REPO / "jobs" / "data" / task / f"{split}.jsonl"))
        assert dataset.format == ("prompt-completion" if task == "units" else "chat")


def test_exact():
    assert exact(" 2024-03-07\n", "2024-03-07")
    assert not exact("2024-3-7", "2024-03-07")


def test_json_equal():
    assert json_equal('{"b": 2, "a": "x"}', '{"a": "x", "b": 2}')
    assert not json_equal('{"a": "2"}', '{"a": 2}')  # types matter
    assert not json_equal('{"a": 1', '{"a": 1}')


def test_sql_equal():
    ref = "SELECT COUNT(*) FROM orders WHERE status = 'shipped';"
    assert sql_equal("select count(*)  from orders where status='shipped'", ref)
    assert not sql_equal("SELECT COUNT(*) FROM orders WHERE status = 'Shipped';", ref)  # literals keep case
    assert not sql_equal("SELECT COUNT(id) FROM orders WHERE status = 'shipped';", ref)
