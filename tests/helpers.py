"""Shared non-fixture helpers of the test suite (tests/ is on sys.path through tests/conftest.py).

run_pipeline, REPO and TINY drive `python -m pipeline` on tiny settings; tiny_model, finished_run and
the architecture table build the small models and finished stage runs that the export tests share.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline import runs
from pipeline.files import write_json
from pipeline.model import GPT, GPTConfig, pad_vocab
from pipeline.tokenizer import save_tokenizer

REPO = Path(__file__).resolve().parents[1]

# A model and a run small enough for seconds on a 2-core CPU.
TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=64",
    "tokenizer.vocab_size=320",
    "data.batch_size=8",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "samples.num_prompts=2",
    "samples.max_new_tokens=8",
]


def run_pipeline(*overrides: str, root: Path, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIPELINE_OUTPUTS": str(root), "WANDB_MODE": "offline"}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-5000:]}")
    return result


def start_pipeline(args: list[str], root: Path) -> subprocess.Popen:
    """`python -m pipeline ARGS` in the background (to be killed), its stderr in root/stderr.txt (a pipe nobody reads would fill and block it)."""
    env = {**os.environ, "PIPELINE_OUTPUTS": str(root), "WANDB_MODE": "offline"}
    with (root / "stderr.txt").open("w") as err:
        return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)


def roots_sharing(source: Path, where: Path, names: tuple[str, ...], parts: tuple[str, ...] = ("ppo", "cache")) -> dict[str, Path]:
    """Fresh outputs roots under `where`, one per name, each seeing `parts` of the `source` root (finished runs, the data cache) through links."""
    roots = {}
    for name in names:
        roots[name] = where / name
        roots[name].mkdir()
        for part in parts:
            (roots[name] / part).symlink_to(source / part, target_is_directory=True)
    return roots


def kill_when(proc: subprocess.Popen, reached, stderr: Path, timeout: float = 300) -> None:
    """SIGKILL proc (started by start_pipeline) as soon as reached() is true; fail, with the end of its stderr, if it ends first or time runs out."""
    deadline = time.time() + timeout
    try:
        while not reached():
            assert proc.poll() is None, f"the run ended before it could be killed:\n{stderr.read_text()[-4000:]}"
            assert time.time() < deadline, "no checkpoint appeared before the deadline"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def checkpoint_step(run_dir: Path) -> int:
    """The global step of run_dir/checkpoints/last.ckpt; 0 while there is none (or it is being written)."""
    try:
        return torch.load(Path(run_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    except Exception:
        return 0


# ---------------------------------------------------------------------------------------------
# Export to transformers (tests/model/test_hf.py, tests/stages/test_export.py)

TOKENIZER_SIZE = 300
VOCAB = pad_vocab(TOKENIZER_SIZE)  # 320: the model's embedding rows, a multiple of 64
GPT2_STYLE = dict(pos_emb="learned", norm="layernorm", mlp="gelu")
ARCHS = {
    "gpt2": dict(GPT2_STYLE, bias=True),
    "gpt2-nobias-untied": dict(GPT2_STYLE, bias=False, tie_embeddings=False),
    "llama-gqa": dict(n_head=4, n_kv_head=2, rope_theta=500.0),
    "llama-bias-untied": dict(bias=True, tie_embeddings=False),
    "llama-narrow-heads": dict(n_head=2, n_kv_head=1, head_dim=8),  # n_head * head_dim < n_embd: a model whose heads were pruned
}


def tiny_model(seed: int = 0, vocab_size: int = VOCAB, **arch) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**dict(vocab_size=vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=32), **arch})).eval()
    with torch.no_grad():  # away from the init's zero biases and unit gains, so every parameter matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def finished_run(root: Path, stage: str, name: str, model: GPT, tokenizer) -> Path:
    run_dir = root / stage / name
    save_tokenizer(tokenizer, run_dir / runs.TOKENIZER_DIR)
    runs.save_model(run_dir / runs.MODEL_FILE, model, kind="lm", stage=stage)
    write_json(run_dir / runs.METRICS_FILE, {"stage": stage})
    return run_dir


# ---------------------------------------------------------------------------------------------
# A live server (tests/serving/, tests/tools/test_servebench.py)


class LiveServer:
    """`python -m pipeline stage=serve` as a real process on a free loopback port; `url` once /health answers.

    Use as a context manager: leaving it sends SIGTERM and waits (kill after `timeout`); `returncode`
    is then the server's exit code.
    """

    def __init__(self, root: Path, *overrides: str, run_dir: Path | None = None, timeout: float = 60, env: dict | None = None):
        import json
        import signal
        import time
        import urllib.request

        self.run_dir = run_dir or root / "serve" / f"live-{os.getpid()}-{time.monotonic_ns()}"
        self.timeout = timeout
        self._signal, self._json = signal, json
        command = [sys.executable, "-m", "pipeline", "stage=serve", "serve.port=0", f"paths.root={root}", f"hydra.run.dir={self.run_dir}", *overrides]
        # Output to files, not pipes: a server that logs more than a pipe holds would block on its writes.
        self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(self.run_dir.parent / f"{self.run_dir.name}.stdout", "w+")
        self._err = open(self.run_dir.parent / f"{self.run_dir.name}.stderr", "w+")
        self.process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "WANDB_MODE": "offline", **(env or {})}, stdout=self._out, stderr=self._err, text=True)
        deadline = time.monotonic() + timeout
        info = self.run_dir / "server.json"
        while not info.is_file():
            if self.process.poll() is not None or time.monotonic() > deadline:
                out, err = self.stop()
                raise AssertionError(f"the server did not start (exit {self.process.returncode})\nSTDOUT:\n{out[-2000:]}\nSTDERR:\n{err[-4000:]}")
            time.sleep(0.05)
        self.url = json.loads(info.read_text())["url"]
        while True:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError("the server never answered /health") from None
                time.sleep(0.05)

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def stop(self) -> tuple[str, str]:
        """SIGTERM, then the process's stdout and stderr once it has exited (killed after `timeout`)."""
        if self.process.poll() is None:
            self.process.send_signal(self._signal.SIGTERM)
        try:
            self.process.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._out.seek(0), self._err.seek(0)
        self.stdout, self.stderr = self._out.read(), self._err.read()
        return self.stdout, self.stderr

    def __enter__(self) -> "LiveServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
