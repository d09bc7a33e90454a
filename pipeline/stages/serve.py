"""`python -m pipeline stage=serve`: an OpenAI-compatible server for trained models, with a chat page.

    python -m pipeline stage=serve                                   # the newest finished policy (ppo first), port 8000
    python -m pipeline stage=serve init_from=outputs/sft/default serve.port=8001
    python -m pipeline stage=serve serve.models=[outputs/ppo/default,outputs/sft/default]   # both; `model` picks
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "ppo/default", "messages": [{"role": "user", "content": "Reverse the list: a b c"}], "temperature": 0}'

The HTTP side is pipeline/serving/api.py (FastAPI under uvicorn, as vLLM's own OpenAI server),
generation pipeline/serving/scheduler.py (continuous batching through the engine). The run
directory gets server.json (address, models, pid) once the server listens, and serve.json (the
requests answered) when it stops. A serve run writes no model.pt: it is never a finished run, and
the same command serves again.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from pathlib import Path

import torch
import uvicorn
from omegaconf import DictConfig

from pipeline import runs
from pipeline.errors import UserError
from pipeline.model import quant
from pipeline.files import write_json
from pipeline.serving.api import Defaults, Served, create_app
from pipeline.serving.metrics import Metrics
from pipeline.serving.scheduler import Scheduler
from pipeline.stages import STAGES

log = logging.getLogger(__name__)

API_KEY_ENV = "PIPELINE_API_KEY"


def model_id(path: Path, root: Path) -> str:
    """A served model's name: <stage>/<run> for a run under the outputs root, else the folder's (or file's) name."""
    run_dir = path.parent if path.is_file() and path.name == runs.MODEL_FILE else path
    try:
        return run_dir.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return run_dir.name if run_dir.is_dir() else run_dir.stem


def load(cfg: DictConfig, given: str | None, root: Path, metrics: Metrics) -> Served:
    model, tokenizer, payload, path = runs.load_start(given, STAGES["serve"].starts_from, root, "serve")
    if payload.get("kind") == "scalar":
        raise UserError(f"{path} is a reward model (a scalar head), not a policy: serve an sft, ppo or pretrain run")
    model.eval().requires_grad_(False)
    if torch.cuda.is_available():
        model = quant.place(model, "cuda")  # a quantised model (stage=quantize) stays on the CPU its kernels are for
    path = Path(path)
    path = path.parent if path.name == runs.MODEL_FILE else path  # a run's directory, as the user names runs
    name = model_id(path, root)
    scheduler = Scheduler(
        model, tokenizer, name=name, max_batch=int(cfg.serve.max_batch_size), window_s=float(cfg.serve.batch_window_ms) / 1000,
        seed=int(cfg.seed), metrics=metrics,
    )
    created = int(runs.model_file(path).stat().st_mtime)
    return Served(name, path, payload.get("stage"), created, tokenizer, scheduler, model.config.block_size, model.config.vocab_size)


class Server(uvicorn.Server):
    """uvicorn's server, except that SIGTERM / Ctrl-C end it with exit code 0 after the graceful shutdown.

    uvicorn finishes the requests in flight, then raises the signal again, which kills the process
    with the signal's code; for a server told to stop, stopping is success.
    """

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True
        log.info("signal %s: no new requests; finishing the ones in flight", signal.Signals(sig).name)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    root = Path(cfg.paths.root)
    if cfg.serve.threads is not None:
        torch.set_num_threads(int(cfg.serve.threads))
    metrics = Metrics()
    given = [str(m) for m in cfg.serve.models] or [cfg.init_from]
    served = [load(cfg, g, root, metrics) for g in given]
    ids = [s.id for s in served]
    if len(set(ids)) != len(ids):
        raise UserError(f"serve.models: two models would have the same name ({ids}): serve runs with different names")
    api_key = cfg.serve.api_key if cfg.serve.api_key is not None else os.environ.get(API_KEY_ENV) or None
    app = create_app(served, api_key=str(api_key) if api_key is not None else None, defaults=Defaults(float(cfg.serve.temperature), int(cfg.serve.max_tokens)), metrics=metrics)
    sock = bind(str(cfg.serve.host), int(cfg.serve.port))
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=float(cfg.serve.shutdown_timeout_s), access_log=False)
    server = Server(config)
    for s in served:
        s.scheduler.start()
    run_dir.mkdir(parents=True, exist_ok=True)
    url = f"http://{host}:{port}"
    write_json(run_dir / "server.json", {"url": url, "pid": os.getpid(), "models": [s.card() for s in served], "api_key": api_key is not None})
    log.info("serving %s at %s/v1 (chat page: %s/)%s", ", ".join(ids), url, url, " with an API key" if api_key else "")
    print(f"serving {', '.join(ids)} at {url}/v1 (chat page: {url}/)", flush=True)
    started = time.time()
    try:
        server.run(sockets=[sock])
    finally:
        # uvicorn put back the handlers it found (SIGTERM's default kills): a repeated SIGTERM while the
        # last requests finish and this run winds up is the same request to stop, not a reason to die.
        signal.signal(signal.SIGTERM, lambda sig, frame: log.info("SIGTERM: already stopping"))
        for s in served:
            s.scheduler.stop(timeout=float(cfg.serve.shutdown_timeout_s))
    summary = {
        "stage": "serve",
        "url": url,
        "models": ids,
        "time/total_s": time.time() - started,
        "requests": {
            f"{sample.labels['endpoint']} {sample.labels['status']}": int(sample.value)
            for family in metrics.requests.collect() for sample in family.samples if sample.name.endswith("_total")
        },
    }
    write_json(run_dir / "serve.json", summary)
    log.info("server stopped; requests answered: %s", summary["requests"])
    return summary


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is named in one line and port 0 finds a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"serve.host={host} serve.port={port}: cannot listen there ({e.strerror}); pick another serve.port (0: any free one)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
