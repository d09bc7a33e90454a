"""Load benchmark of the OpenAI-compatible server (`stage=serve`): 1, 4, 16 and 64 concurrent streaming clients,
batching on against batching off, each mode a live server process on the loopback interface.

    python -m pipeline.tools.servebench                                          # the newest finished policy (ppo first)
    python -m pipeline.tools.servebench init_from=outputs/ppo/default
    python -m pipeline.tools.servebench servebench.concurrency=1,16 servebench.modes=on servebench.max_tokens=32

Per mode, one `python -m pipeline stage=serve serve.port=0 hydra.run.dir=<tmp>/serve-<mode>` with the other
overrides of the command line (init_from, paths.root, serve.*): batching on is serve.max_batch_size as
configured (64 unless the command says otherwise), batching off serve.max_batch_size=1. The bench waits for
the run's server.json and GET /health, sends `servebench.warmup` untimed requests, runs the levels, scrapes
GET /metrics, then stops the server with SIGTERM and records its exit code (0 for a clean stop).

A level of c clients: c asyncio clients, each its own httpx.AsyncClient (one connection), send streamed chat
completions (`stream_options.include_usage`, `servebench.temperature`, `servebench.max_tokens`, and the server's
`ignore_eos` extension while servebench.ignore_eos is true: every answer that long) one after the
other until max(servebench.requests, 2c) requests have been sent or servebench.level_timeout_s has passed
(then no new request starts; the ones in flight finish, each within servebench.request_timeout_s). The
prompts are the embedded task's held-out (test) prompts, the gold evaluation's, in the same order at every
level of every mode: request i of a level asks prompt i mod servebench.prompts.

Per request: latency (sent to last byte), time to first token (sent to the first chunk with content),
completion tokens (the usage chunk), and an error if the status is not 200, a chunk is an error, the stream
ends without usage or [DONE], the request times out or the connection fails (its message kept). Per level:
requests/s and generated tokens/s (completed requests and the sum of their completion tokens over the
level's wall time), p50/p95/p99 latency and TTFT, errors, and the mean rows per decode step over the
level (from the server's pipeline_batch_size histogram). Prints a markdown table and writes
<paths.root>/bench/servebench.json (or servebench.out=FILE). Loopback only: a non-loopback serve.host is refused.

The defaults (DEFAULTS: 128 requests a level, 64 new tokens with ignore_eos, a 60 s bound a level) take about a minute for the
tiny model on 2 CPU cores, and at most 8 levels x (60 s + the requests in flight) for a slow one. The bench's
clients share the machine with the server: on a small CPU they take part of its time (the JSON's machine facts
say how many cores, threads and what load there was). OMP_NUM_THREADS reaches the server through the environment.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import torch
from hydra import compose, initialize_config_dir

import pipeline
from pipeline.errors import UserError
from pipeline.files import read_json, write_json

CONF_DIR = str(pipeline.CONF_DIR)
REPO = Path(pipeline.__file__).resolve().parents[1]
API_KEY_ENV = "PIPELINE_API_KEY"
MODES = {"on": None, "off": 1}  # serve.max_batch_size: None keeps the configured one
DEFAULTS = {
    "modes": "on,off",
    "concurrency": "1,4,16,64",
    "requests": 128,  # requests per level: this many, and at least 2 per client
    "max_tokens": 64,
    "temperature": 0.0,
    # true: every answer runs to max_tokens (the server's ignore_eos, as vLLM's serving benchmarks fix output lengths), so that
    # tokens/s measures the server rather than how long the model's answers happen to be; false: the model's own lengths.
    "ignore_eos": True,
    "prompts": 200,  # the first N held-out prompts, asked in turn
    "warmup": 2,  # untimed requests before a server's first level
    "level_timeout_s": 60.0,  # no new request of a level starts after this
    "request_timeout_s": 120.0,  # one request's bound, first byte to last
    "start_timeout_s": 300.0,  # the server's start: loading the model up to its first /health
    "root": None,  # keep the servers' run directories (logs, server.json, serve.json) here
    "out": None,
}
INTEGERS = ("requests", "max_tokens", "prompts", "warmup")
FLOATS = ("temperature", "level_timeout_s", "request_timeout_s", "start_timeout_s")
OWN_KEYS = ("serve.port", "hydra.run.dir", "paths.run_dir")  # the bench sets these itself
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


# ---------------------------------------------------------------------------------------------
# The command line


def parse(argv: list[str]) -> tuple[dict, list[str]]:
    """(servebench settings, the overrides for the server) of the command line."""
    settings = dict(DEFAULTS)
    rest = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if key.startswith("servebench."):
            name = key[len("servebench.") :]
            if name not in DEFAULTS:
                raise UserError(f"{key}: unknown; the servebench keys are {', '.join('servebench.' + k for k in DEFAULTS)}")
            if not eq:
                raise UserError(f"{key}: give a value ({key}=...)")
            settings[name] = number(key, value, int if name in INTEGERS else float) if name in INTEGERS + FLOATS else value
        elif key.lstrip("+~") in OWN_KEYS:
            raise UserError(f"{key}: the bench sets it itself (each server listens on a free loopback port in its own run directory)")
        else:
            rest.append(arg)
    if isinstance(settings["ignore_eos"], str):
        if settings["ignore_eos"].lower() not in ("true", "false"):
            raise UserError(f"servebench.ignore_eos={settings['ignore_eos']}: must be true or false")
        settings["ignore_eos"] = settings["ignore_eos"].lower() == "true"
    for name in ("requests", "max_tokens", "prompts"):
        if settings[name] < 1:
            raise UserError(f"servebench.{name}={settings[name]}: must be at least 1")
    if settings["warmup"] < 0:
        raise UserError(f"servebench.warmup={settings['warmup']}: must be 0 or more")
    if settings["temperature"] < 0:
        raise UserError(f"servebench.temperature={settings['temperature']}: must be 0 (greedy) or more")
    for name in ("level_timeout_s", "request_timeout_s", "start_timeout_s"):
        if settings[name] <= 0:
            raise UserError(f"servebench.{name}={settings[name]}: must be more than 0 seconds")
    levels = []
    for part in str(settings["concurrency"]).split(","):
        c = number("servebench.concurrency", part.strip(), int)
        if c < 1:
            raise UserError(f"servebench.concurrency={settings['concurrency']}: each level is a number of clients, at least 1 (got {c})")
        levels.append(c)
    settings["concurrency"] = sorted(set(levels))
    modes = [m.strip() for m in str(settings["modes"]).split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise UserError(f"servebench.modes={settings['modes']}: a list of {' and '.join(MODES)} (batching on, batching off)")
    settings["modes"] = [m for m in MODES if m in modes]
    return settings, rest


def number(key: str, value: str, kind):
    try:
        return kind(value)
    except ValueError:
        raise UserError(f"{key}={value}: not {'an integer' if kind is int else 'a number'}") from None


def override(rest: list[str], key: str) -> str | None:
    """The value the command gives a key (the last one), or None."""
    values = [o.split("=", 1)[1] for o in rest if "=" in o and o.split("=", 1)[0].lstrip("+~") == key]
    return values[-1] if values else None


def server_config(rest: list[str]):
    """The serve stage's config under the user's overrides: a mistyped key fails here, in one line."""
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("config", overrides=["stage=serve", *rest])
    except Exception as e:  # hydra's composition errors: an unknown key, a bad group choice
        raise UserError(f"{' '.join(rest)}: not a valid override for stage=serve: {str(e).splitlines()[0]}") from None


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# The prompts


def held_out_prompts(n: int) -> list[list[dict]]:
    """The first n test prompts of the embedded task (the gold evaluation's, pipeline/evaluate.py), as chat messages."""
    from pipeline.tasks import default_task

    rows = default_task().prompt_rows("test", n)
    return [r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": str(r["prompt"])}] for r in rows]


# ---------------------------------------------------------------------------------------------
# The server process


class ServerProcess:
    """One `python -m pipeline stage=serve` on a free loopback port, its output in <run_dir>/server.log."""

    def __init__(self, mode: str, run_dir: Path, rest: list[str], max_batch: int | None, start_timeout_s: float):
        self.mode, self.run_dir = mode, run_dir
        args = [o for o in rest if not (max_batch is not None and o.split("=", 1)[0].lstrip("+~") == "serve.max_batch_size")]
        if max_batch is not None:
            args.append(f"serve.max_batch_size={max_batch}")
        self.command = [sys.executable, "-m", "pipeline", "stage=serve", "serve.port=0", f"hydra.run.dir={run_dir}", *args]
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None
        self.info: dict = {}
        self.url = ""

    def start(self) -> dict:
        import httpx

        self.run_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]), "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
        self.log = (self.run_dir / "server.log").open("wb")
        self.process = subprocess.Popen(self.command, env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        started = time.perf_counter()
        deadline = started + self.start_timeout_s
        server_json = self.run_dir / "server.json"
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"the batching-{self.mode} server exited with code {self.process.returncode} before it listened:\n{self.tail()}\n(command: {' '.join(self.command[1:])})")
            if server_json.is_file():
                try:
                    self.info = read_json(server_json)
                except ValueError:  # written atomically, but be patient anyway
                    self.info = {}
                if self.info.get("url"):
                    self.url = self.info["url"]
                    host = urlsplit(self.url).hostname or ""
                    if not is_loopback(host):
                        raise UserError(f"the server listens at {self.url}: the bench talks to loopback servers only")
                    try:
                        if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                            return {"start_s": time.perf_counter() - started, "url": self.url, "models": self.info.get("models", [])}
                    except httpx.HTTPError:
                        pass
            time.sleep(0.2)
        raise UserError(f"the batching-{self.mode} server did not answer /health within {self.start_timeout_s:g} s (servebench.start_timeout_s):\n{self.tail()}")

    def stop(self, timeout: float = 120) -> dict:
        """SIGTERM, then its exit code (a kill after `timeout` seconds is recorded as such)."""
        out = {"exit_code": None, "killed": False}
        if self.process is None:
            return out
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                out["killed"] = True
        out["exit_code"] = self.process.returncode
        if not self.log.closed:
            self.log.close()
        summary = self.run_dir / "serve.json"
        if summary.is_file():
            out["served"] = read_json(summary).get("requests")
        if out["exit_code"] != 0:
            out["log_tail"] = self.tail()
        return out

    def tail(self, lines: int = 15) -> str:
        path = self.run_dir / "server.log"
        text = path.read_text(errors="replace") if path.is_file() else ""
        kept = [line for line in text.strip().splitlines() if line.strip()]
        return "\n".join(kept[-lines:])[-3000:]


# ---------------------------------------------------------------------------------------------
# The clients


async def one_request(client, url: str, body: dict, timeout_s: float) -> dict:
    """One streamed chat completion: {latency_s, ttft_s, completion_tokens, text} or {..., error}."""
    import httpx

    sent = time.perf_counter()
    out: dict = {"latency_s": None, "ttft_s": None, "completion_tokens": 0}
    text: list[str] = []

    async def read() -> None:
        usage, done = None, False
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raw = (await response.aread()).decode(errors="replace")
                try:
                    message = json.loads(raw)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = raw[:300]
                out["error"] = f"HTTP {response.status_code}: {message}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out["error"] = f"error chunk: {chunk['error'].get('message')}"
                    return
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        if out["ttft_s"] is None:
                            out["ttft_s"] = time.perf_counter() - sent
                        text.append(piece)
        if not done:
            out["error"] = "the stream ended without data: [DONE]"
        elif usage is None:
            out["error"] = "the stream has no usage chunk (stream_options.include_usage)"
        else:
            out["completion_tokens"] = int(usage.get("completion_tokens") or 0)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        out["error"] = f"timed out after {timeout_s:g} s (servebench.request_timeout_s)"
    except httpx.HTTPError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    except (ValueError, KeyError, TypeError) as e:
        out["error"] = f"a malformed chunk: {type(e).__name__}: {e}"
    out["latency_s"] = time.perf_counter() - sent
    out["text"] = "".join(text)
    return out


def request_body(settings: dict, messages: list[dict], model: str | None) -> dict:
    body = {
        "messages": messages, "stream": True, "stream_options": {"include_usage": True},
        "temperature": settings["temperature"], "max_tokens": settings["max_tokens"],
    }
    if settings["ignore_eos"]:
        body["ignore_eos"] = True
    if model:
        body["model"] = model
    return body


def headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def run_level(url: str, settings: dict, prompts: list, clients: int, model: str | None, api_key: str | None) -> tuple[dict, list[dict]]:
    """One level: `clients` clients until the level's count of requests is sent or its time bound passes."""
    import httpx

    total = max(int(settings["requests"]), 2 * clients)
    issued = 0
    results: list[tuple[int, dict]] = []
    started = time.perf_counter()
    deadline = started + float(settings["level_timeout_s"])
    timeout = httpx.Timeout(float(settings["request_timeout_s"]), connect=10.0)

    async def client_loop() -> None:
        nonlocal issued
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers(api_key), trust_env=False) as client:
            while issued < total and time.perf_counter() < deadline:
                index = issued
                issued += 1
                body = request_body(settings, prompts[index % len(prompts)], model)
                results.append((index, await one_request(client, url, body, float(settings["request_timeout_s"]))))

    await asyncio.gather(*(client_loop() for _ in range(clients)))
    wall = time.perf_counter() - started
    results.sort(key=lambda r: r[0])
    return summarize(clients, total, wall, [r for _, r in results], issued < total), [{"index": i, **r} for i, r in results]


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between the closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(clients: int, planned: int, wall: float, results: list[dict], stopped_by_time: bool) -> dict:
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    latency = [r["latency_s"] for r in ok]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tokens = sum(r["completion_tokens"] for r in ok)
    return {
        "clients": clients,
        "requests_planned": planned,
        "requests": len(results),
        "completed": len(ok),
        "errors": len(errors),
        "error_messages": sorted(set(errors))[:10],
        "stopped_by": "time" if stopped_by_time else "count",
        "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
        "completion_tokens": tokens,
        "generated_tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "mean_completion_tokens": tokens / len(ok) if ok else None,
        **{f"latency_p{q}_s": percentile(latency, q) for q in (50, 95, 99)},
        "latency_mean_s": sum(latency) / len(latency) if latency else None,
        **{f"ttft_p{q}_s": percentile(ttft, q) for q in (50, 95, 99)},
    }


async def warm_up(url: str, settings: dict, prompts: list, model: str | None, api_key: str | None) -> list[str]:
    import httpx

    errors = []
    async with httpx.AsyncClient(timeout=float(settings["request_timeout_s"]), headers=headers(api_key), trust_env=False) as client:
        for i in range(int(settings["warmup"])):
            result = await one_request(client, url, request_body(settings, prompts[i % len(prompts)], model), float(settings["request_timeout_s"]))
            if "error" in result:
                errors.append(result["error"])
    return errors


def scrape(url: str, api_key: str | None) -> dict:
    """pipeline_batch_size's sum and count (over every served model) from GET /metrics."""
    import httpx

    text = httpx.get(f"{url}/metrics", headers=headers(api_key), timeout=10, trust_env=False).text
    figures = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        match = re.match(r"pipeline_batch_size_(sum|count)(?:\{[^}]*\})?\s+(\S+)", line)
        if match:
            figures[match.group(1)] += float(match.group(2))
    return figures


def mean_batch(before: dict, after: dict) -> float | None:
    steps = after["count"] - before["count"]
    return (after["sum"] - before["sum"]) / steps if steps > 0 else None


def bench_mode(mode: str, settings: dict, rest: list[str], base: Path, prompts: list, api_key: str | None) -> dict:
    """One server: start it, warm up, every level, the /metrics scrape, SIGTERM; its rows and facts."""
    server = ServerProcess(mode, base / f"serve-{mode}", rest, MODES[mode], float(settings["start_timeout_s"]))
    print(f"servebench: starting the batching-{mode} server ...", file=sys.stderr, flush=True)
    try:
        facts = server.start()
    except BaseException:  # a server that failed to start, or Ctrl-C while it loads: never leave it running
        server.stop()
        raise
    out = {"mode": mode, "command": " ".join(server.command[1:]), **facts}
    rows = []
    try:
        model = facts["models"][0]["id"] if facts.get("models") else None
        out["model"] = model
        out["warmup_errors"] = asyncio.run(warm_up(server.url, settings, prompts, model, api_key))
        first = scrape(server.url, api_key)
        for clients in settings["concurrency"]:
            before = scrape(server.url, api_key)
            row, requests = asyncio.run(run_level(server.url, settings, prompts, clients, model, api_key))
            row = {"batching": mode, **row, "mean_batch_size": mean_batch(before, scrape(server.url, api_key))}
            row["texts"] = {str(r["index"] % len(prompts)): r["text"] for r in requests if "error" not in r}
            rows.append(row)
            print(
                f"servebench: batching {mode}, {clients} clients: {row['completed']}/{row['requests']} requests in {row['wall_s']:.1f} s, "
                f"{row['generated_tokens_per_s']:.0f} tok/s, {row['errors']} errors" + (f" ({row['error_messages'][0]})" if row["errors"] else ""),
                file=sys.stderr, flush=True,
            )
        last = scrape(server.url, api_key)
        out["batch_size_mean"] = mean_batch({"sum": 0.0, "count": 0.0}, last)  # the whole run's, warm-up included
        out["batch_size_mean_levels"] = mean_batch(first, last)
        out["decode_steps"] = last["count"]
    finally:
        out.update(server.stop())
    print(f"servebench: the batching-{mode} server exited with code {out['exit_code']}", file=sys.stderr, flush=True)
    return {**out, "rows": rows}


# ---------------------------------------------------------------------------------------------
# The report


def machine() -> dict:
    model = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def seconds(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}" if x < 10 else f"{x:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def add_ratios(rows: list[dict]) -> None:
    """vs 1 client: a row's generated tokens/s over its mode's 1-client row's."""
    for row in rows:
        one = next((r for r in rows if r["batching"] == row["batching"] and r["clients"] == 1), None)
        row["vs_1_client"] = row["generated_tokens_per_s"] / one["generated_tokens_per_s"] if one and one["generated_tokens_per_s"] else None


def markdown(rows: list[dict]) -> str:
    columns = ["batching", "clients", "requests", "errors", "req/s", "gen tok/s", "vs 1 client", "p50 latency (s)", "p95 latency (s)", "p99 latency (s)", "p50 TTFT (s)", "p95 TTFT (s)", "mean batch"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [
            r["batching"], str(r["clients"]), str(r["requests"]), str(r["errors"]), f"{r['requests_per_s']:.2f}", f"{r['generated_tokens_per_s']:.0f}",
            f"{r['vs_1_client']:.2f}x" if r.get("vs_1_client") is not None else "-",
            seconds(r["latency_p50_s"]), seconds(r["latency_p95_s"]), seconds(r["latency_p99_s"]), seconds(r["ttft_p50_s"]), seconds(r["ttft_p95_s"]),
            f"{r['mean_batch_size']:.1f}" if r.get("mean_batch_size") is not None else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def on_vs_off(rows: list[dict]) -> dict[int, float | None]:
    by = {(r["batching"], r["clients"]): r["generated_tokens_per_s"] for r in rows}
    return {c: (by[("on", c)] / by[("off", c)] if by[("off", c)] else None) for m, c in by if m == "on" and ("off", c) in by}


def agreement(servers: list[dict]) -> dict:
    """With temperature 0: how many prompts got the same answer in every row (batching and batch size should not change a greedy answer)."""
    texts: dict[str, set] = {}
    for server in servers:
        for row in server["rows"]:
            for prompt, text in row["texts"].items():
                texts.setdefault(prompt, set()).add(text)
    same = sum(len(t) == 1 for t in texts.values())
    return {"prompts": len(texts), "same_answer_everywhere": same, "differing": sorted((p for p, t in texts.items() if len(t) > 1), key=int)[:20]}


def main(argv: list[str]) -> dict:
    settings, rest = parse(argv)
    host = override(rest, "serve.host")
    if host is not None and not is_loopback(host):
        raise UserError(f"serve.host={host}: the bench runs on the loopback interface only (127.0.0.1, ::1 or localhost)")
    cfg = server_config(rest)
    if not is_loopback(str(cfg.serve.host)):
        raise UserError(f"serve.host={cfg.serve.host}: the bench runs on the loopback interface only (127.0.0.1, ::1 or localhost)")
    api_key = cfg.serve.api_key if cfg.serve.api_key is not None else os.environ.get(API_KEY_ENV) or None
    out = Path(settings["out"]) if settings["out"] else Path(cfg.paths.root) / "bench" / "servebench.json"
    keep = bool(settings["root"])
    base = Path(settings["root"]).resolve() if keep else Path(tempfile.mkdtemp(prefix="servebench-")).resolve()
    prompts = held_out_prompts(int(settings["prompts"]))
    facts = machine()
    started = time.perf_counter()
    servers = []
    try:
        for mode in settings["modes"]:
            servers.append(bench_mode(mode, settings, rest, base, prompts, str(api_key) if api_key else None))
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    rows = [r for s in servers for r in s["rows"]]
    add_ratios(rows)
    same = agreement(servers) if settings["temperature"] == 0 else None
    for row in rows:
        row.pop("texts")
    compare = on_vs_off(rows)
    on16 = next((r["vs_1_client"] for r in rows if r["batching"] == "on" and r["clients"] == 16), None)
    result = {
        "settings": {k: settings[k] for k in DEFAULTS if k not in ("root", "out")},
        "overrides": rest,
        "machine": facts,
        "model": servers[0].get("model") if servers else None,
        "servers": [{k: v for k, v in s.items() if k != "rows"} for s in servers],
        "rows": rows,
        "on_vs_off_tokens_per_s": {str(c): v for c, v in compare.items()},
        "greedy_agreement": same,
        "summary": {
            "errors": sum(r["errors"] for r in rows) + sum(len(s.get("warmup_errors", [])) for s in servers),
            "server_exit_codes": {s["mode"]: s["exit_code"] for s in servers},
            "batching_on_16_vs_1_clients": on16,
        },
        "wall_s": time.perf_counter() - started,
    }
    print(f"\nserving {result['model']} on {facts['cpu_model'] or 'cpu'} ({facts['cpus_usable']} of {facts['cpu_count']} CPUs usable, torch {facts['torch_threads']} threads)")
    print(f"streamed chat completions, max_tokens={settings['max_tokens']}{' (ignore_eos: every answer that long)' if settings['ignore_eos'] else ''}, temperature={settings['temperature']:g}, at least {settings['requests']} requests (and 2 per client) per level, {settings['level_timeout_s']:g} s bound per level\n")
    print(markdown(rows))
    if compare:
        print("\nbatching on vs off, generated tokens/s: " + ", ".join(f"{c} client{'s' if c > 1 else ''} {v:.2f}x" if v is not None else f"{c}: -" for c, v in sorted(compare.items())))
    for s in servers:
        print(f"batching {s['mode']}: mean rows per decode step {s['batch_size_mean']:.2f} over {int(s['decode_steps'])} steps; exit code {s['exit_code']}" if s.get("batch_size_mean") is not None else f"batching {s['mode']}: exit code {s['exit_code']}")
    if same is not None and same["prompts"]:
        print(f"greedy answers: {same['same_answer_everywhere']} of {same['prompts']} prompts got the same text in every row")
    write_json(out, result)
    print(f"\nwritten to {out}")
    return result


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
