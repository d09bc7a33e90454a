"""The HTTP side: OpenAI's chat and completions endpoints, the model list, health, metrics and the chat page.

    POST /v1/chat/completions   messages through the model's chat template; stream (SSE) or not
    POST /v1/completions        a prompt (text or token ids), with echo and logprobs (lm-eval's local-completions)
    GET  /v1/models             every served model: its run directory, stage and creation time
    GET  /health                no key needed
    GET  /metrics               Prometheus' text format (pipeline/serving/metrics.py)
    GET  /                      the chat page (static/index.html)

Generation happens in each model's Scheduler thread; a handler turns a request into a
scheduler.Request, then reads its events from an asyncio queue as they come. A client that goes
away (a closed stream, a dropped connection) cancels its request, which frees its rows in the
batch at the next token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.data.chat import prompt_ids
from pipeline.model.engine import Sampling
from pipeline.serving import scheduler as sched
from pipeline.serving.metrics import Metrics
from pipeline.serving.protocol import APIError, ChatRequest, CompletionRequest, param_name

PAGE = Path(__file__).parent / "static" / "index.html"
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/metrics", "/health", "/")
log = logging.getLogger(__name__)

POLL_S = 0.25  # how often a non-streamed request looks whether its client is still there


@dataclass
class Served:
    """One model behind the API: what /v1/models lists and what a request's `model` picks."""

    id: str
    path: Path  # the run directory (or file) it was loaded from
    stage: str | None
    created: int  # when its run finished (its model file's time), seconds since the epoch
    tokenizer: object
    scheduler: sched.Scheduler
    block_size: int
    vocab_size: int

    def card(self) -> dict:
        return {
            "id": self.id, "object": "model", "created": self.created, "owned_by": "pipeline",
            "root": str(self.path), "run_dir": str(self.path), "stage": self.stage, "max_model_len": self.block_size,
        }


@dataclass
class Defaults:
    temperature: float = 1.0
    max_tokens: int = 64  # chat answers when the request gives no max_tokens (capped by the context left)


def create_app(models: list[Served], *, api_key: str | None = None, defaults: Defaults | None = None, metrics: Metrics | None = None) -> FastAPI:
    if not models:
        raise ValueError("create_app needs at least one model")
    defaults = defaults or Defaults()
    metrics = metrics or Metrics()
    by_id = {m.id: m for m in models}
    app = FastAPI(title="pipeline OpenAI-compatible server", docs_url=None, redoc_url=None)
    app.state.models, app.state.metrics = by_id, metrics

    def endpoint(request: Request) -> str:
        path = request.url.path
        return path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")

    def error_response(request: Request, error: APIError) -> JSONResponse:
        started = getattr(request.state, "started", time.perf_counter())
        metrics.answered(endpoint(request), error.status, time.perf_counter() - started)
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        return error_response(request, error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(request, APIError(400, "the request body is not valid JSON", "body"))
        param = param_name(first.get("loc", ()))
        if param == "body" and first.get("type") in ("dict_type", "model_attributes_type"):
            return error_response(request, APIError(400, "the request body must be a JSON object (Content-Type: application/json)", "body"))
        message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        named = message.split(":", 1)[0]
        if param == "body" and named.isidentifier():  # a check across fields names the field it refuses
            return error_response(request, APIError(400, message, named))
        if first.get("type") == "missing":
            message = "this field is required"
        return error_response(request, APIError(400, f"{param}: {message}", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        return error_response(request, APIError(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def _crash(request: Request, error: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=error)
        return error_response(request, APIError(500, f"internal error: {type(error).__name__}: {error}"))

    app.add_middleware(Clock)

    async def authorized(request: Request) -> None:  # async: FastAPI runs a plain def dependency in a thread pool
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")

    def pick(name: str | None) -> Served:
        if name is None:
            return models[0]
        if name not in by_id:
            raise APIError(404, f"model '{name}' is not served here; served: {', '.join(by_id)}", "model", "model_not_found")
        return by_id[name]

    def answered(request: Request, status: int = 200) -> None:
        metrics.answered(endpoint(request), status, time.perf_counter() - request.state.started)

    @app.get("/health")
    async def health(request: Request):
        answered(request)
        return {"status": "ok", "models": list(by_id)}

    @app.get("/", include_in_schema=False)
    async def page(request: Request):
        answered(request)
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def prometheus(request: Request):
        answered(request)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def list_models(request: Request):
        answered(request)
        return {"object": "list", "data": [m.card() for m in models]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorized)])
    async def one_model(name: str, request: Request):
        card = pick(name).card()
        answered(request)
        return card

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(body: ChatRequest, request: Request):
        served = pick(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        ids = prompt_ids(served.tokenizer, messages)
        max_new = fit(served, len(ids), body.max_new, defaults.max_tokens, "messages", "max_tokens" if body.max_tokens else "max_completion_tokens")
        top = (body.top_logprobs or 0) if body.logprobs else None
        job = submit(served, ids, max_new, body, top, prompt_logprobs=False)
        name = served.id
        if body.stream:
            return stream(request, job, lambda: chat_chunks(request, job, name, body))
        choices, usage = await collect(request, job)
        answered(request)
        return {
            "id": job.id, "object": "chat.completion", "created": job.created, "model": name,
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": {"content": [chat_logprob(t) for t in c.tokens]} if top is not None else None, "finish_reason": c.finish}
                for i, c in enumerate(choices)
            ],
            "usage": usage,
        }

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        served = pick(body.model)
        if body.stream and len(body.prompts()) > 1:
            raise APIError(400, "stream: streaming takes one prompt per request", "stream")
        jobs = []
        for i, prompt in enumerate(body.prompts()):
            where = "prompt" if isinstance(body.prompt, str) or all(isinstance(p, int) for p in body.prompt) else f"prompt[{i}]"
            if isinstance(prompt, str):
                ids = prompt_ids(served.tokenizer, prompt)  # BOS + text, as standard text rows were trained
            else:
                bad = next((t for t in prompt if not 0 <= t < served.vocab_size), None)
                if bad is not None:
                    raise APIError(400, f"{where}: token id {bad} is outside the vocabulary [0, {served.vocab_size})", where)
                ids = list(prompt)
            max_new = fit(served, len(ids), body.max_tokens, body.max_tokens, where, "max_tokens", zero_ok=body.echo)
            jobs.append(submit(served, ids, max_new, body, body.logprobs, prompt_logprobs=body.echo and body.logprobs is not None, text=prompt))
        if body.stream:
            job = jobs[0]
            return stream(request, job, lambda: completion_chunks(request, job, served, body))
        results = [await collect(request, job) for job in jobs]
        answered(request)
        choices = []
        for j, (job, (rows, _)) in enumerate(zip(jobs, results)):
            for c in rows:
                text, logprobs = completion_choice(served, job, c, body)
                choices.append({"index": j * body.n + c.index, "text": text, "logprobs": logprobs, "finish_reason": c.finish})
        usage = {k: sum(u[k] for _, u in results) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        return {"id": jobs[0].id, "object": "text_completion", "created": jobs[0].created, "model": served.id, "choices": choices, "usage": usage}

    # -- requests and their events -------------------------------------------------------------

    def fit(served: Served, prompt_len: int, asked: int | None, default: int, where: str, max_key: str, zero_ok: bool = False) -> int:
        room = served.block_size - prompt_len
        if room <= 0 and not (zero_ok and asked == 0 and room == 0):
            raise APIError(400, f"{where}: the prompt is {prompt_len} tokens; this model's context is {served.block_size} tokens, which leaves no room for an answer", where, "context_length_exceeded")
        if asked is not None and asked > room:
            raise APIError(400, f"{max_key}: {prompt_len} prompt tokens + {max_key}={asked} is more than this model's context of {served.block_size} tokens (at most {room} here)", max_key, "context_length_exceeded")
        return asked if asked is not None else min(default, room)

    def submit(served: Served, ids: list[int], max_new: int, body, top: int | None, prompt_logprobs: bool, text=None) -> "Job":
        temperature = defaults.temperature if body.temperature is None else body.temperature
        generator = None
        if body.seed is not None:
            generator = torch.Generator(device=served.scheduler.generator.device).manual_seed(int(body.seed))
        loop = asyncio.get_running_loop()
        request = sched.Request(
            prompt_ids=ids, max_tokens=max_new, sampling=Sampling(temperature, body.top_k, body.top_p, generator),
            loop=loop, queue=asyncio.Queue(), n=body.n, stop=tuple(body.stop or ()), logprobs=top, prompt_logprobs=prompt_logprobs,
            ignore_eos=body.ignore_eos,
        )
        try:
            served.scheduler.submit(request)
        except RuntimeError as e:
            raise APIError(503, str(e)) from None
        return Job(request, sched.request_id("chatcmpl" if isinstance(body, ChatRequest) else "cmpl"), int(time.time()), text)

    async def collect(request: Request, job: "Job") -> tuple[list["Choice"], dict]:
        """Every choice of a request, finished; cancels it if the client leaves while it waits."""
        try:
            while not job.finished:
                job.take(await job.next_event(request), metrics, endpoint(request))
        except ClientGone:
            raise APIError(499, "client closed the request") from None
        except asyncio.CancelledError:
            job.request.cancelled.set()
            raise
        finally:
            job.close()
        if job.error:
            raise APIError(500, job.error)
        return job.choices, job.usage()

    def stream(request: Request, job: "Job", chunks) -> StreamingResponse:
        async def events():
            status = 200
            try:
                try:
                    pending = []
                    async for chunk in chunks():
                        pending.append(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n")
                        if job.request.queue.empty():  # one write for what is there: a lagging loop catches up in one go
                            yield "".join(pending)
                            pending.clear()
                    if pending:
                        yield "".join(pending)
                except ClientGone:
                    return
                if job.error:
                    status = 500
                    yield f"data: {json.dumps(APIError(500, job.error).body())}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also when the client went away mid-stream: its rows leave the batch at the next token
                job.request.cancelled.set()
                job.close()
                metrics.answered(endpoint(request), status if job.finished else 499, time.perf_counter() - request.state.started)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def chat_chunks(request: Request, job: "Job", name: str, body: ChatRequest):
        base = {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": name}
        for i in range(body.n):
            yield {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
        async for kind, choice, text, info, finish in job.updates(request, metrics, "/v1/chat/completions"):
            if kind == "token":
                logprobs = {"content": [chat_logprob(info)]} if info is not None else None
                yield {**base, "choices": [{"index": choice, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": None}]}
            else:
                yield {**base, "choices": [{"index": choice, "delta": {}, "logprobs": None, "finish_reason": finish}]}
        if body.stream_options and body.stream_options.include_usage and not job.error:
            yield {**base, "choices": [], "usage": job.usage()}

    async def completion_chunks(request: Request, job: "Job", served: Served, body: CompletionRequest):
        base = {"id": job.id, "object": "text_completion", "created": job.created, "model": served.id}
        if body.echo:
            prompt_rows = await job.prompt_rows(request, metrics, "/v1/completions") if job.request.prompt_logprobs else None
            echo, logprobs = echo_part(served, job, prompt_rows, body)
            for i in range(body.n):
                yield {**base, "choices": [{"index": i, "text": echo, "logprobs": logprobs, "finish_reason": None}]}
        async for kind, choice, text, info, finish in job.updates(request, metrics, "/v1/completions"):
            if kind == "token":
                logprobs = completion_logprobs([info], 0) if info is not None else None
                yield {**base, "choices": [{"index": choice, "text": text, "logprobs": logprobs, "finish_reason": None}]}
            else:
                yield {**base, "choices": [{"index": choice, "text": "", "logprobs": None, "finish_reason": finish}]}
        if body.stream_options and body.stream_options.include_usage and not job.error:
            yield {**base, "choices": [], "usage": job.usage()}

    def echo_part(served: Served, job: "Job", prompt_rows, body: CompletionRequest) -> tuple[str, dict | None]:
        text = job.text if isinstance(job.text, str) else served.tokenizer.decode(job.request.prompt_ids, skip_special_tokens=True)
        if prompt_rows is None:
            return text, None
        rows = [r or {"id": t, "token": served.scheduler.token_text(t), "logprob": None, "top": None} for r, t in zip(prompt_rows, job.request.prompt_ids)]
        return text, completion_logprobs(rows, 0, served.tokenizer)

    def completion_choice(served: Served, job: "Job", choice: "Choice", body: CompletionRequest) -> tuple[str, dict | None]:
        text, tokens, offset = choice.text, list(choice.tokens), 0
        if body.echo:
            echo, _ = echo_part(served, job, None, body)
            text, offset = echo + text, 0
            if body.logprobs is not None:
                rows = [r or {"id": t, "token": served.scheduler.token_text(t), "logprob": None, "top": None} for r, t in zip(job.prompt or [], job.request.prompt_ids)]
                tokens = rows + tokens
        return text, (completion_logprobs(tokens, offset, served.tokenizer) if body.logprobs is not None else None)

    return app


def chat_logprob(info: dict) -> dict:
    """A token's entry in chat's logprobs.content."""
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {**entry(info["token"], info["logprob"]), "top_logprobs": [entry(t, v) for _, t, v in info["top"]]}


def completion_logprobs(rows: list[dict], offset: int, tokenizer=None) -> dict:
    """The legacy completions' logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    offsets = []
    for row in rows:
        offsets.append(offset)
        offset += 0 if row["id"] in special else len(row["token"])
    return {
        "tokens": [r["token"] for r in rows],
        "token_logprobs": [r["logprob"] for r in rows],
        "top_logprobs": [None if r["top"] is None else top_by_text(r["top"]) for r in rows],
        "text_offset": offsets,
    }


class Clock:
    """Stamps each request's arrival (request.state.started) for the latency figures: a plain ASGI middleware,
    as Starlette's BaseHTTPMiddleware costs a task and a stream per request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scope.setdefault("state", {})["started"] = time.perf_counter()
        await self.app(scope, receive, send)


class ClientGone(Exception):
    """The client of a request disconnected."""


def top_by_text(top: list[tuple]) -> dict:
    """The legacy format's {token text: log-prob}: two tokens with the same text (byte pieces that both print
    as U+FFFD) share a key, which keeps the larger log-prob (the list is sorted), so max() stays the top one."""
    out: dict = {}
    for _, text, value in top:
        out.setdefault(text, value)
    return out


@dataclass
class Choice:
    index: int
    text: str = ""
    tokens: list = None
    finish: str | None = None
    generated: int = 0

    def __post_init__(self):
        self.tokens = [] if self.tokens is None else self.tokens


class Job:
    """A submitted request as the handler follows it: its choices so far, its prompt's log-probs, an error."""

    def __init__(self, request: sched.Request, id: str, created: int, text=None):
        self.request, self.id, self.created, self.text = request, id, created, text
        self.choices = [Choice(i) for i in range(request.n)]
        self.prompt: list | None = None
        self.error: str | None = None
        self._first = False
        self._pending: list[tuple] = []
        self._watcher: asyncio.Task | None = None

    @property
    def finished(self) -> bool:
        return self.error is not None or all(c.finish is not None for c in self.choices)

    def take(self, event: tuple, metrics: Metrics, endpoint: str) -> tuple | None:
        """Apply one scheduler event; returns (kind, choice, text, info, finish) for a stream, None otherwise."""
        kind = event[0]
        if kind == "error":
            self.error = event[1]
            return None
        if kind == "prompt":
            self.prompt = event[1]
            return None
        if not self._first:
            self._first = True
            metrics.ttft.labels(endpoint).observe(time.perf_counter() - self.request.submitted)
        choice = self.choices[event[1]]
        if choice.finish is not None:  # a late event of a failed request
            return None
        if kind == "token":
            _, _, text, info = event
            choice.text += text
            if info is not None:
                choice.tokens.append(info)
            return ("token", choice.index, text, info, None)
        _, _, finish, generated = event
        choice.finish, choice.generated = finish, generated
        return ("done", choice.index, None, None, finish)

    async def next_event(self, client: Request) -> tuple:
        """The request's next event; raises ClientGone (and cancels the request) once its client has disconnected.

        A watcher task looks at the client every POLL_S, also while events keep coming: uvicorn drops
        the bytes written to a closed connection without an error, so a stream would otherwise run to
        its end. It puts a ("gone",) event in the queue, so waiting for an event needs no timeout.
        """
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(client))
        event = await self.request.queue.get()
        if event[0] == "gone":
            raise ClientGone()
        return event

    async def _watch(self, client: Request) -> None:
        while not self.finished:
            await asyncio.sleep(POLL_S)
            if not self.finished and await client.is_disconnected():
                self.request.cancelled.set()
                self.request.queue.put_nowait(("gone",))
                return

    def close(self) -> None:
        """Stop watching the client (the answer is complete or abandoned)."""
        if self._watcher is not None:
            self._watcher.cancel()

    async def prompt_rows(self, client: Request, metrics: Metrics, endpoint: str):
        while self.prompt is None and not self.finished:
            update = self.take(await self.next_event(client), metrics, endpoint)
            if update is not None:
                self._pending.append(update)
        return self.prompt

    async def updates(self, client: Request, metrics: Metrics, endpoint: str):
        while self._pending:
            yield self._pending.pop(0)
        while not self.finished:
            update = self.take(await self.next_event(client), metrics, endpoint)
            if update is not None:
                yield update

    def usage(self) -> dict:
        prompt = len(self.request.prompt_ids)
        completion = sum(c.generated for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
