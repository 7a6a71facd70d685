"""Continuous batching through the whole Serve app, with an injected engine (ModelServer's loader) whose
every decode step takes a known time: a short answer next to a long one ends first, with its usage
and [DONE]; a request sent mid-generation joins the running batch; a closed stream frees its slot.
The app runs two gateway replicas, so the streams also cross whichever one Serve's proxy picks."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from qlora_ray.store import Store
from tests.helpers import MODEL, STEP_SECONDS, fake_engine_app, fake_loader

@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("streams")
    with fake_engine_app(Store(str(tmp_path / "store")), tmp_path, ["acme"], fake_loader,
                         {"max_batch": 2, "max_tokens": 400, "gateway_replicas": 2}) as (url, _):
        yield f"{url}/v1"


def test_the_gateway_runs_as_many_replicas_as_asked(app):
    from ray import serve

    gateway = serve.status().applications["t"].deployments["Gateway"]
    assert gateway.replica_states == {"RUNNING": 2}


class Arrivals:
    """Every chunk of every stream, in the order the clients received them."""

    def __init__(self):
        self.lock = threading.Lock()
        self.order: list[tuple[str, str]] = []  # (stream, "token" | "usage" | "done")

    def seen(self, name: str, what: str) -> None:
        with self.lock:
            self.order.append((name, what))

    def tokens_of_before(self, name: str, event: tuple[str, str]) -> int:
        """How many tokens `name` had received when `event` arrived."""
        return sum(1 for item in self.order[:self.order.index(event)] if item == (name, "token"))


def stream(url: str, max_tokens: int, arrivals: Arrivals, name: str, texts: dict, close_after: int | None = None) -> None:
    """A streamed completion; every chunk's arrival goes to `arrivals`, its text to texts[name]."""
    body = {"model": MODEL, "prompt": "a", "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    text = ""
    with requests.post(f"{url}/completions", json=body, headers={"Authorization": "Bearer key-acme"},
                       stream=True, timeout=60) as response:
        assert response.status_code == 200, response.text
        for raw in response.iter_lines():
            if not raw:
                continue
            line = raw.decode()
            if line == "data: [DONE]":
                arrivals.seen(name, "done")
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                arrivals.seen(name, "usage")
                texts[f"{name}-usage"] = chunk["usage"]
            for choice in chunk["choices"]:
                for character in choice["text"]:  # one letter per token (a chunk may carry several)
                    text += character
                    arrivals.seen(name, "token")
            if close_after is not None and len(text) >= close_after:
                break
    texts[name] = text


def run_streams(app: str, arrivals: Arrivals, texts: dict, *specs) -> list[threading.Thread]:
    threads = [threading.Thread(target=stream, args=(app, max_tokens, arrivals, name, texts), kwargs=kwargs)
               for name, max_tokens, kwargs in specs]
    for thread in threads:
        thread.start()
    return threads


def wait_for_tokens(arrivals: Arrivals, name: str, count: int) -> None:
    deadline = time.monotonic() + 60
    while arrivals.order.count((name, "token")) < count:
        assert time.monotonic() < deadline, f"{name} never reached {count} tokens"
        time.sleep(STEP_SECONDS)


def test_a_short_answer_next_to_a_long_one_ends_first_with_its_usage_and_done(app):
    arrivals, texts = Arrivals(), {}
    for thread in run_streams(app, arrivals, texts, ("long", 200, {}), ("short", 4, {})):
        thread.join(timeout=60)
    assert len(texts["short"]) == 4 and len(texts["long"]) == 200
    assert texts["short-usage"]["completion_tokens"] == 4
    short_events = [what for name, what in arrivals.order if name == "short"]
    assert short_events == ["token"] * 4 + ["usage", "done"]
    assert arrivals.tokens_of_before("long", ("short", "done")) < 100  # it did not wait for the long one


def test_a_request_sent_mid_generation_joins_the_running_batch(app):
    arrivals, texts = Arrivals(), {}
    (long,) = run_streams(app, arrivals, texts, ("long", 200, {}))
    wait_for_tokens(arrivals, "long", 20)
    for thread in run_streams(app, arrivals, texts, ("joined", 5, {})):
        thread.join(timeout=60)
    long.join(timeout=60)
    assert len(texts["joined"]) == 5
    assert arrivals.tokens_of_before("long", ("joined", "done")) < 100


def test_a_closed_stream_frees_its_slot_for_the_next_request(app):
    """max_batch 2: a long stream and one whose client leaves after 3 tokens fill both slots; a third
    request is answered while the long one is still going, not after the left one's 300 steps."""
    arrivals, texts = Arrivals(), {}
    long, _ = run_streams(app, arrivals, texts, ("long", 300, {}), ("left", 300, {"close_after": 3}))
    wait_for_tokens(arrivals, "long", 20)
    for thread in run_streams(app, arrivals, texts, ("third", 3, {})):
        thread.join(timeout=60)
    long.join(timeout=60)
    assert len(texts["third"]) == 3 and len(texts["left"]) == 3
    assert arrivals.tokens_of_before("long", ("third", "done")) < 150
