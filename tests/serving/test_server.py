"""`python -m pipeline stage=serve` as a real process, driven by the official `openai` client (and raw httpx for
what that client will not send): answers, streams, log-probs, concurrency, bad requests, keys, disconnects, SIGTERM.

The model is random but decisive (an untied output layer with large weights): at temperature 0 the
argmax is never a near tie, so float rounding that differs with the batch's shape cannot flip a token
and "the same answer alone or in a batch" is a fair test. Its EOS row is zeroed, so greedy answers run
to max_tokens and their lengths are known.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from helpers import LiveServer, run_pipeline
from pipeline import runs
from pipeline.files import write_json
from pipeline.model import GPT, GPTConfig
from pipeline.tokenizer import save_tokenizer, train_tokenizer

pytestmark = pytest.mark.timeout(180)

TEXTS = [f"Reverse the list: {a} {b} {c}. Sure, here it is: {c} {b} {a}." for a, b, c in zip("abcdefgh", "ijklmnop", "qrstuvwx")] * 4
QUESTIONS = [f"Reverse the list: {a} {b} {c}" for a, b, c in zip("abcdefghijklmnop", "bcdefghijklmnopq", "cdefghijklmnopqr")]


def decisive_run(root: Path, name: str, block_size: int = 96, n_layer: int = 1, n_embd: int = 32, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(TEXTS, 300)
    model = GPT(GPTConfig(vocab_size=320, block_size=block_size, n_layer=n_layer, n_head=2, n_embd=n_embd, tie_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)
        model.lm_head.weight[tokenizer.eos_token_id] = 0.0  # no EOS: answers run to max_tokens
    run_dir = root / "ppo" / name
    save_tokenizer(tokenizer, run_dir / runs.TOKENIZER_DIR)
    runs.save_model(run_dir / runs.MODEL_FILE, model, kind="lm", stage="ppo")
    write_json(run_dir / runs.METRICS_FILE, {"stage": "ppo"})
    return run_dir


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus' text format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + ("{" + want + "}" if want else "")) and not line.startswith("#"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    decisive_run(root, "default")
    decisive_run(root, "other", seed=1)
    with LiveServer(root, "serve.models=[ppo/default,ppo/other]".replace("ppo/", f"{root}/ppo/"), "serve.temperature=0") as live:
        live.root = root
        live.client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        yield live
    assert live.returncode == 0, live.stderr[-3000:]


def ask(client, question: str, model: str = "ppo/default", **kwargs) -> str:
    kwargs = {"temperature": 0, "max_tokens": 12, **kwargs}
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], **kwargs)
    return r.choices[0].message.content


def test_models_lists_every_served_model_with_its_run(server):
    cards = {m.id: m for m in server.client.models.list().data}
    assert set(cards) == {"ppo/default", "ppo/other"}
    card = cards["ppo/default"].model_dump()
    assert card["stage"] == "ppo" and Path(card["run_dir"]) == server.root / "ppo" / "default"
    assert abs(card["created"] - (server.root / "ppo" / "default" / "model.pt").stat().st_mtime) < 2
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_chat_answer_usage_and_model_choice(server):
    r = server.client.chat.completions.create(model="ppo/default", messages=[{"role": "user", "content": QUESTIONS[0]}], temperature=0, max_tokens=10)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 10 and r.usage.prompt_tokens > 5 and r.usage.total_tokens == r.usage.prompt_tokens + 10
    assert r.model == "ppo/default" and r.object == "chat.completion"
    # the other model answers the same question otherwise
    assert ask(server.client, QUESTIONS[0], "ppo/other") != ask(server.client, QUESTIONS[0])


def test_stream_joined_equals_the_answer_at_temperature_0(server):
    answer = ask(server.client, QUESTIONS[1], max_tokens=16)
    chunks = list(server.client.chat.completions.create(
        model="ppo/default", messages=[{"role": "user", "content": QUESTIONS[1]}], temperature=0, max_tokens=16,
        stream=True, stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # it really streamed
    assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices


def test_stop_strings_n_and_seed(server):
    full = ask(server.client, QUESTIONS[2], max_tokens=20)
    stop = full[5:8]
    cut = ask(server.client, QUESTIONS[2], max_tokens=20, stop=[stop])
    assert cut == full[: full.index(stop)]
    streamed = "".join(c.choices[0].delta.content or "" for c in server.client.chat.completions.create(
        model="ppo/default", messages=[{"role": "user", "content": QUESTIONS[2]}], temperature=0, max_tokens=20, stop=stop, stream=True) if c.choices)
    assert streamed == cut  # the stream held back the stop string's first characters until it knew
    sampled = dict(temperature=1.0, max_tokens=12, n=3, seed=7)
    r1 = server.client.chat.completions.create(model="ppo/default", messages=[{"role": "user", "content": QUESTIONS[3]}], **sampled)
    r2 = server.client.chat.completions.create(model="ppo/default", messages=[{"role": "user", "content": QUESTIONS[3]}], **sampled)
    assert [c.index for c in r1.choices] == [0, 1, 2]
    assert [c.message.content for c in r1.choices] == [c.message.content for c in r2.choices]  # seeded: reproducible
    assert len({c.message.content for c in r1.choices}) > 1  # three samples, not one answer three times


def test_completions_logprobs_are_the_models_own(server):
    model, tokenizer, _, _ = runs.load_start(str(server.root / "ppo" / "default"), (), server.root, "test")
    prompt = "Reverse the list: a b c. Sure"
    r = server.client.completions.create(model="ppo/default", prompt=prompt, max_tokens=4, echo=True, logprobs=2, temperature=0)
    lp = r.choices[0].logprobs
    ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert r.choices[0].text.startswith(prompt) and len(lp.tokens) == len(ids) + 4
    with torch.no_grad():
        full = torch.tensor([ids + [0] * 4])
        # the generated tokens: greedy, so the argmax after each prefix
        for k in range(4):
            full[0, len(ids) + k] = model(full[:, : len(ids) + k])[0, -1].argmax()
        own = torch.log_softmax(model(full)[0].float(), dim=-1)
    expected = [own[t - 1, full[0, t]].item() for t in range(1, full.size(1))]
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    for t, top in enumerate(lp.top_logprobs[1:], start=1):
        # (the legacy format keys the top tokens by text: two byte tokens that both print as U+FFFD are one key)
        texts = {tokenizer.decode([int(i)], skip_special_tokens=False) for i in own[t - 1].topk(2).indices}
        assert set(top) == texts  # the two most likely tokens' texts, one key when they print alike
        assert max(top.values()) == pytest.approx(own[t - 1].max().item(), abs=1e-4)
    # token ids in, as lm-eval's local-completions sends them: scored as they are (no BOS added)
    r = server.client.completions.create(model="ppo/default", prompt=ids[1:], max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert len(r.choices[0].logprobs.tokens) == len(ids)  # len(ids) - 1 prompt tokens + 1
    # several prompts in one request: one choice each, in order
    r = server.client.completions.create(model="ppo/default", prompt=["Reverse", "Sure, here"], max_tokens=3, temperature=0)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 6


def test_16_concurrent_requests_each_equal_to_its_answer_alone(server):
    alone = [ask(server.client, q, max_tokens=24) for q in QUESTIONS]
    before = httpx.get(server.url + "/metrics").text
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda q: ask(server.client, q, max_tokens=24), QUESTIONS))
    after = httpx.get(server.url + "/metrics").text
    assert together == alone
    steps = metric(after, "pipeline_batch_size_count", model="ppo/default") - metric(before, "pipeline_batch_size_count", model="ppo/default")
    rows = metric(after, "pipeline_batch_size_sum", model="ppo/default") - metric(before, "pipeline_batch_size_sum", model="ppo/default")
    assert rows == 16 * 24 and steps < 16 * 24 / 2  # decoded together: fewer than half the steps one at a time would take


@pytest.mark.parametrize(
    "body, status, param, words",
    [
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature", "less than or equal to 2"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "'user'"),
        ({"messages": []}, 400, "messages", "at least 1"),
        ({"model": "ppo/default"}, 400, "messages", "required"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n", "greater than or equal to 1"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
        ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
        ({"messages": [{"role": "user", "content": "word " * 200}]}, 400, "messages", "context is 96 tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 500}, 400, "max_tokens", "more than this model's context"),
        ({"model": "ppo/missing", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "not served here"),
    ],
)
def test_bad_chat_requests_name_the_field(server, body, status, param, words):
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_bad_completions_requests_and_bodies(server):
    def post(**kwargs):
        return httpx.post(server.url + "/v1/completions", **kwargs)

    r = post(json={"prompt": [5, 999999]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "outside the vocabulary" in r.json()["error"]["message"]
    r = post(json={"prompt": "hi", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = post(json={"prompt": ["a", "b"], "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    r = post(content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    # the openai client raises its typed errors on them
    with pytest.raises(openai.NotFoundError, match="not served here"):
        server.client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="context"):
        server.client.completions.create(model="ppo/default", prompt="word " * 200)


def test_a_client_cut_off_mid_stream_frees_its_place(tmp_path):
    decisive_run(tmp_path, "long", block_size=1024)
    with LiveServer(tmp_path, "serve.max_batch_size=1") as live:
        with httpx.stream("POST", live.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 1000, "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(4):
                next(lines)
        # batching off: the next request can only run once the cut one has left the batch
        started = time.monotonic()
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        assert ask(client, "hello", model="ppo/long", max_tokens=5)
        waited = time.monotonic() - started
        text = httpx.get(live.url + "/metrics").text
        generated = metric(text, "pipeline_generated_tokens_total", model="ppo/long")
        assert generated < 1000, (generated, waited)  # the cut request stopped well before its 1000 tokens
        assert metric(text, "pipeline_running_sequences", model="ppo/long") == 0
    assert live.returncode == 0


def test_sigterm_finishes_requests_in_flight_and_exits_0(tmp_path):
    decisive_run(tmp_path, "long", block_size=1024)
    with LiveServer(tmp_path) as live:
        results, first_chunk = {}, threading.Barrier(4)

        def stream(i: int) -> None:
            chunks, after = [], 0
            with httpx.stream("POST", live.url + "/v1/chat/completions", timeout=60, json={"messages": [{"role": "user", "content": QUESTIONS[i]}], "temperature": 0, "max_tokens": 600, "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        chunks.append(line[6:])
                        if len(chunks) == 2:
                            first_chunk.wait()
                        after += signalled.is_set()
            results[i] = (chunks, after)

        signalled = threading.Event()
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        first_chunk.wait()  # every stream has begun
        live.process.send_signal(signal.SIGTERM)
        signalled.set()
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # no new requests once stopping
            httpx.get(live.url + "/health", timeout=2)
        for t in threads:
            t.join(60)
        live.process.wait(60)
    assert live.returncode == 0, live.stderr[-3000:]
    for chunks, after in results.values():
        assert chunks[-1] == "[DONE]" and after > 0  # still streaming when the signal came, and finished
        finish = [json.loads(c)["choices"][0]["finish_reason"] for c in chunks[:-1] if json.loads(c)["choices"]]
        assert finish[-1] == "length"
    assert json.loads((live.run_dir / "serve.json").read_text())["requests"]["/v1/chat/completions 200"] == 3


def test_api_key_guards_every_endpoint_but_health(tmp_path):
    decisive_run(tmp_path, "default")
    with LiveServer(tmp_path, env={"PIPELINE_API_KEY": "s3cret"}) as live:
        assert httpx.get(live.url + "/health").status_code == 200
        for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")]:
            r = httpx.request(method, live.url + path, json={}, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
            assert httpx.request(method, live.url + path, json={}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=live.url + "/v1", api_key="s3cret", max_retries=0)
        assert ask(good, "hi", model="ppo/default", max_tokens=3)


def test_a_port_in_use_or_a_missing_model_exits_2(tmp_path):
    """(Bad serve.* values are in tests/test_bad_input.py's catalogue.)"""
    decisive_run(tmp_path, "default")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    r = run_pipeline("stage=serve", f"serve.port={port}", f"paths.root={tmp_path}", root=tmp_path, check=False)
    taken.close()
    assert r.returncode == 2 and f"serve.port={port}" in r.stderr and "cannot listen" in r.stderr
    r = run_pipeline("stage=serve", f"serve.models=[{tmp_path}/nowhere]", f"paths.root={tmp_path}", root=tmp_path, check=False)
    assert r.returncode == 2 and "nowhere" in r.stderr


def test_ignore_eos_runs_an_answer_to_max_tokens(tmp_path):
    """A model that answers EOS at once (its last norm's output is a constant that the EOS row matches) stops at
    once; with ignore_eos (vLLM's extension, what fixed-length benchmarks send) it runs to max_tokens."""
    torch.manual_seed(0)
    tokenizer = train_tokenizer(TEXTS, 300)
    model = GPT(GPTConfig(vocab_size=320, block_size=64, n_layer=1, n_head=2, n_embd=32, norm="layernorm", bias=True, tie_embeddings=False))
    with torch.no_grad():
        model.norm_f.weight.zero_()
        model.norm_f.bias.normal_()
        model.lm_head.weight[tokenizer.eos_token_id] = 10 * model.norm_f.bias
    run_dir = tmp_path / "ppo" / "eos"
    save_tokenizer(tokenizer, run_dir / runs.TOKENIZER_DIR)
    runs.save_model(run_dir / runs.MODEL_FILE, model, kind="lm", stage="ppo")
    write_json(run_dir / runs.METRICS_FILE, {"stage": "ppo"})
    with LiveServer(tmp_path) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        kwargs = dict(model="ppo/eos", messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=9)
        stopped = client.chat.completions.create(**kwargs)
        assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].message.content == "" and stopped.usage.completion_tokens == 1
        full = client.chat.completions.create(**kwargs, extra_body={"ignore_eos": True})
        assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 9
