"""One model's generation loop: requests queue up, join the running batch between tokens, stream back.

A `Scheduler` owns a model and a thread. The thread takes waiting requests into the running
`engine.DecodeBatch` (continuous batching: a request arriving while others generate joins them at
the next token), samples every row under its own settings, turns tokens into text, applies the stop
conditions and hands each request its events on the server's event loop. HTTP handling stays on
that loop (pipeline/serving/api.py); torch runs here, so the loop keeps answering while the model
computes (torch releases the GIL).

Failure stays where it happened: a request whose text handling fails is failed alone; a prefill that
fails fails the requests that were joining; a decode step that fails fails the rows in the batch,
and the loop goes on with the next requests.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from pipeline.model.engine import DecodeBatch, Sampling, sample_rows

log = logging.getLogger(__name__)


@dataclass
class Request:
    """What to generate for one prompt, and where its events go (an asyncio queue on `loop`).

    Events, in order for each choice: ("token", choice, text_delta, token_info | None) ... then
    ("done", choice, finish_reason, tokens_generated); ("prompt", logprob_rows) once first when `prompt_logprobs`;
    ("error", message) ends every choice that has not finished.
    """

    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    n: int = 1
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: no per-token log-probs; k >= 0: the chosen token's and the top k
    prompt_logprobs: bool = False  # the prompt's own tokens scored too (completions' echo)
    ignore_eos: bool = False  # EOS is a token like any other: the answer runs to max_tokens
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None  # perf_counter of the first token of any choice
    failed: bool = False

    def emit(self, events: list[tuple]) -> None:
        if events and not self.cancelled.is_set():
            try:
                self.loop.call_soon_threadsafe(_put_all, self.queue, events)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                self.cancelled.set()


def _put_all(queue: asyncio.Queue, events: list[tuple]) -> None:
    for event in events:
        queue.put_nowait(event)


def _put_many(deliveries: list[tuple[asyncio.Queue, list[tuple]]]) -> None:
    for queue, events in deliveries:
        _put_all(queue, events)


def deliver(batches: list[tuple["Request", list[tuple]]]) -> None:
    """Hand several requests their events with one wake-up of each event loop (not one per request per token)."""
    by_loop: dict[int, tuple] = {}
    for request, events in batches:
        if events and not request.cancelled.is_set():
            by_loop.setdefault(id(request.loop), (request.loop, []))[1].append((request.queue, events))
    for loop, deliveries in by_loop.values():
        try:
            loop.call_soon_threadsafe(_put_many, deliveries)
        except RuntimeError:  # that event loop is closed: nobody is listening any more
            pass


@dataclass
class Row:
    """One choice of one request in the batch: its tokens so far and how much of their text has gone out."""

    request: Request
    choice: int
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already sent
    done: bool = False


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters to keep unsent: the longest tail that may begin a stop string, or a partial character."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    if text.endswith("\ufffd"):  # the bytes of a character split over tokens: wait for the rest
        hold = max(hold, 1)
    return hold


class Scheduler:
    """The generation loop of one served model (see the module docstring).

    max_batch: most sequences decoded together (1: one request at a time, batching off);
    window_s: how long an idle loop waits after the first request for others to arrive with it.
    """

    def __init__(self, model, tokenizer, *, name: str, max_batch: int = 64, window_s: float = 0.005, seed: int = 0, metrics=None):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.max_batch, self.window_s = max(1, int(max_batch)), float(window_s)
        self.metrics = metrics
        self.eos_id = tokenizer.eos_token_id
        self.block_size = model.config.block_size
        self.generator = torch.Generator(device=model.wte.weight.device).manual_seed(int(seed))
        self.waiting: deque[Request] = deque()
        self.condition = threading.Condition()
        self.stopping = False
        self.batch = DecodeBatch(model)
        self._token_text: dict[int, str] = {}
        self._step_s = 0.0  # how long the last decode step took
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=True)  # the same text, without transformers' wrapper
        else:
            self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        self.thread = threading.Thread(target=self._loop, name=f"scheduler[{name}]", daemon=True)
        self.fault = None  # tests: a callable(row) that raises, to fail one generation from inside the loop

    # -- the server's side ------------------------------------------------------------------------

    def start(self) -> "Scheduler":
        self.thread.start()
        return self

    def submit(self, request: Request) -> None:
        with self.condition:
            if self.stopping:
                raise RuntimeError("the server is shutting down")
            self.waiting.append(request)
            self._gauge_queue()
            self.condition.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is running and waiting, then end the thread."""
        with self.condition:
            self.stopping = True
            self.condition.notify()
        self.thread.join(timeout)

    @property
    def running(self) -> int:
        return len(self.batch)

    # -- the loop ---------------------------------------------------------------------------------

    def _gauge_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(self.name).set(len(self.waiting))

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.condition:
                while not self.waiting and not len(self.batch) and not self.stopping:
                    self.condition.wait()
                if self.stopping and not self.waiting and not len(self.batch):
                    return
                idle = not len(self.batch)
            if idle and self.window_s > 0:
                time.sleep(self.window_s)  # let requests sent together arrive together
            try:
                self._admit()
                if len(self.batch):
                    self._advance()
            except Exception as e:  # never let the loop die: fail what was running, keep serving
                log.exception("generation failed in %s", self.name)
                self._fail_rows(list(self.batch.rows), f"generation failed: {type(e).__name__}: {e}")
                self.batch = DecodeBatch(self.model)

    def _admit(self) -> None:
        """Move waiting requests into the batch, as many as fit; their prompts are prefilled together."""
        joining: list[Request] = []
        with self.condition:
            if len(self.batch) and len(self.waiting) == 1 and time.perf_counter() - self.waiting[0].submitted < self._step_s:
                # A lone newcomer waits one decode step for company: a prefill of two prompts costs about one of
                # one on a small model, so under load this halves the prefills for a token's worth of latency.
                return
            room = self.max_batch - len(self.batch)
            while self.waiting:
                request = self.waiting[0]
                if request.cancelled.is_set():
                    self.waiting.popleft()
                    continue
                if request.n > room and (joining or len(self.batch)):
                    break  # a request with more choices than the room left waits for rows to free up
                joining.append(self.waiting.popleft())
                room -= request.n
                if room <= 0:
                    break
            self._gauge_queue()
        if not joining:
            return
        rows = [Row(r, c) for r in joining for c in range(r.n)]
        try:
            scored = self.batch.join([r.prompt_ids for r in joining], rows, [r.n for r in joining], [r.prompt_logprobs for r in joining])
        except Exception as e:
            log.exception("prefill failed in %s", self.name)
            self._fail_rows(rows, f"generation failed: {type(e).__name__}: {e}")
            return
        for request, logits in zip(joining, scored):
            if logits is not None:
                request.emit([("prompt", self._prompt_logprobs(request, logits))])
            if request.max_tokens == 0:  # the prompt scored only (completions' echo with max_tokens=0)
                request.emit([("done", c, "length", 0) for c in range(request.n)])
        self.batch.keep([row.request.max_tokens > 0 for row in self.batch.rows])

    def _advance(self) -> None:
        """Sample one token for every row, hand it out, drop the rows that finished, feed the rest."""
        batch = self.batch
        settings = [row.request.sampling for row in batch.rows]
        tokens = sample_rows(batch.logits, settings, self.generator)
        wants_logprobs = any(row.request.logprobs is not None for row in batch.rows)
        logprobs = torch.log_softmax(batch.logits.float(), dim=-1) if wants_logprobs else None
        if self.metrics is not None:
            self.metrics.batch_size.labels(self.name).observe(len(batch))
        now = time.perf_counter()
        events: dict[int, list[tuple]] = {}
        kept = []
        token_list = tokens.tolist()
        for i, (row, token) in enumerate(zip(batch.rows, token_list)):
            request = row.request
            if request.cancelled.is_set() or request.failed:
                kept.append(False)
                continue
            try:
                if self.fault is not None:
                    self.fault(row)
                if request.first_token is None:
                    request.first_token = now
                out = events.setdefault(id(request), [])
                self._take(row, token, logprobs[i] if logprobs is not None else None, out)
                kept.append(not row.done)
            except Exception as e:
                log.exception("a generation failed in %s", self.name)
                self._fail_rows([row], f"generation failed: {type(e).__name__}: {e}")
                kept.append(False)
        deliver([(row.request, events.pop(id(row.request))) for row in batch.rows if id(row.request) in events])
        if self.metrics is not None:
            self.metrics.generated_tokens(self.name, len(token_list))
        order = batch.keep(kept)
        if len(batch):
            started = time.perf_counter()
            batch.step(tokens[order.to(tokens.device)])
            self._step_s = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.running.labels(self.name).set(len(batch))

    def _take(self, row: Row, token: int, logprobs: torch.Tensor | None, out: list[tuple]) -> None:
        """Add one sampled token to a row: its text delta (held back where a stop string may begin), its end."""
        request = row.request
        if token == self.eos_id and not request.ignore_eos:
            text = self._decode(row.ids)
            if len(text) > row.sent:
                out.append(("token", row.choice, text[row.sent :], None))
            row.done = True
            out.append(("done", row.choice, "stop", len(row.ids) + 1))
            return
        row.ids.append(token)
        info = self._token_info(token, logprobs, request.logprobs) if logprobs is not None and request.logprobs is not None else None
        text = self._decode(row.ids)
        cut = min((text.find(s) for s in request.stop if s in text), default=-1)
        if cut >= 0:
            if cut > row.sent:
                out.append(("token", row.choice, text[row.sent : cut], info))
            elif info is not None:
                out.append(("token", row.choice, "", info))
            row.sent, row.done = cut, True
            out.append(("done", row.choice, "stop", len(row.ids)))
            return
        length_done = len(row.ids) >= request.max_tokens or len(request.prompt_ids) + len(row.ids) >= self.block_size
        safe = len(text) if length_done else len(text) - held_back(text, request.stop)
        delta = text[row.sent : safe] if safe > row.sent else ""
        if delta or info is not None:
            out.append(("token", row.choice, delta, info))
        row.sent = max(row.sent, safe)
        if length_done:
            row.done = True
            out.append(("done", row.choice, "length", len(row.ids)))

    def token_text(self, token: int) -> str:
        """A token as text on its own (log-prob listings name tokens by it)."""
        if token not in self._token_text:
            self._token_text[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return self._token_text[token]

    def _token_info(self, token: int, logprobs: torch.Tensor, top: int) -> dict:
        top_values, top_ids = torch.topk(logprobs, top) if top > 0 else (logprobs[:0], logprobs[:0].long())
        return {
            "id": token,
            "token": self.token_text(token),
            "logprob": float(logprobs[token]),
            "top": [(int(t), self.token_text(int(t)), float(v)) for v, t in zip(top_values.tolist(), top_ids.tolist())],
        }

    def _prompt_logprobs(self, request: Request, logits: torch.Tensor) -> list[dict | None]:
        """Each prompt token's log-prob given the tokens before it (None for the first), with the top k there."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (T, V): row t predicts token t + 1
        ids = request.prompt_ids
        rows: list[dict | None] = [None]
        for t in range(1, len(ids)):
            rows.append(self._token_info(ids[t], logprobs[t - 1], request.logprobs or 0))
        return rows

    def _fail_rows(self, rows: list[Row], message: str) -> None:
        for request in {id(r.request): r.request for r in rows}.values():
            if not request.failed:
                request.failed = True
                request.emit([("error", message)])
        if self.metrics is not None:
            self.metrics.running.labels(self.name).set(len(self.batch))


_ids = itertools.count()


def request_id(prefix: str) -> str:
    return f"{prefix}-{int(time.time() * 1000):x}{next(_ids):04x}"
