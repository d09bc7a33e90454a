"""A failure inside one generation fails that request (500, OpenAI's error JSON) and the server keeps serving.

The server runs in this process (a real uvicorn on a loopback port, in a thread), so that a fault can
be planted inside the generation loop: the scheduler's `fault` hook, called for every row at every
token, raises for the requests chosen by their max_tokens.
"""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from pipeline import runs
from pipeline.serving.api import Served, create_app
from pipeline.serving.metrics import Metrics
from pipeline.serving.scheduler import Scheduler
from test_server import decisive_run

pytestmark = pytest.mark.timeout(120)
DOOMED = 13  # requests with this max_tokens fail at their third token


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    run_dir = decisive_run(root, "default")
    model, tokenizer, _, _ = runs.load_start(str(run_dir), (), root, "test")
    metrics = Metrics()
    scheduler = Scheduler(model.eval(), tokenizer, name="m", max_batch=8, metrics=metrics)

    def fault(row):
        if row.request.max_tokens == DOOMED and len(row.ids) == 2:
            raise RuntimeError("planted fault")

    scheduler.fault = fault
    scheduler.start()
    app = create_app([Served("m", run_dir, "ppo", 0, tokenizer, scheduler, model.config.block_size, model.config.vocab_size)], metrics=metrics)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield url, scheduler
    server.should_exit = True
    thread.join(10)
    scheduler.stop(10)


def chat(url: str, max_tokens: int, **extra):
    return httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": max_tokens, **extra}, timeout=30)


def test_a_failed_generation_is_a_500_for_it_alone(app_server):
    url, scheduler = app_server
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda m: chat(url, m), [DOOMED, 10, DOOMED, 11, 12, 9]))
    statuses = [r.status_code for r in answers]
    assert statuses == [500, 200, 500, 200, 200, 200]
    error = answers[0].json()["error"]
    assert error["type"] == "server_error" and "planted fault" in error["message"]
    assert [len(r.json()["choices"][0]["message"]["content"]) > 0 for r in answers if r.status_code == 200] == [True] * 4
    # and the server goes on
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "again"}], max_tokens=4, temperature=0).choices[0].message.content
    with pytest.raises(openai.InternalServerError, match="planted fault"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "again"}], max_tokens=DOOMED, temperature=0)


def test_a_failed_stream_ends_with_an_error_chunk(app_server):
    url, _ = app_server
    with httpx.stream("POST", url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": DOOMED, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and 'planted fault' in lines[-2] and '"error"' in lines[-2]


def test_a_failed_decode_step_fails_the_batch_and_the_loop_goes_on(app_server, monkeypatch):
    url, scheduler = app_server
    calls = {"n": 0}
    step = type(scheduler.batch).step

    def broken(self, tokens):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("the forward broke")
        return step(self, tokens)

    monkeypatch.setattr(type(scheduler.batch), "step", broken)
    r = chat(url, 10)
    assert r.status_code == 500 and "the forward broke" in r.json()["error"]["message"]
    assert chat(url, 10).status_code == 200
