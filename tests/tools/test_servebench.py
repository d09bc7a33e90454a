"""The server load benchmark end to end on a tiny model: two live server processes (batching on and off), streamed
requests at two levels of concurrency, one table and one JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.errors import UserError
from pipeline.tools import servebench
from stages.test_generate import save_run

# The tiny run's context is 64 tokens and its tokenizer is small: the first 16 held-out prompts and 8 new tokens fit.
TINY = ["servebench.concurrency=4,1", "servebench.requests=4", "servebench.max_tokens=8", "servebench.prompts=16", "servebench.warmup=1"]


@pytest.mark.slow
def test_servebench_measures_both_modes_against_live_servers(outputs_root, capsys):
    save_run(outputs_root, "ppo", "default")
    result = servebench.main([f"paths.root={outputs_root}", *TINY])
    rows = result["rows"]
    assert [(r["batching"], r["clients"]) for r in rows] == [("on", 1), ("on", 4), ("off", 1), ("off", 4)]  # sorted levels
    for r in rows:
        assert r["errors"] == 0, r["error_messages"]
        assert r["requests"] == r["completed"] == max(4, 2 * r["clients"]) and r["stopped_by"] == "count"
        assert r["requests_per_s"] > 0 and r["generated_tokens_per_s"] > 0 and 0 < r["mean_completion_tokens"] <= 8
        assert 0 < r["ttft_p50_s"] <= r["latency_p50_s"] <= r["latency_p95_s"] <= r["latency_p99_s"]
    assert [r["vs_1_client"] for r in rows if r["clients"] == 1] == [1.0, 1.0]
    servers = {s["mode"]: s for s in result["servers"]}
    assert {m: s["exit_code"] for m, s in servers.items()} == {"on": 0, "off": 0} and not any(s["killed"] for s in servers.values())
    assert all(s["model"] == "ppo/default" and s["warmup_errors"] == [] for s in servers.values())
    assert "serve.max_batch_size=1" in servers["off"]["command"] and "serve.max_batch_size" not in servers["on"]["command"]
    assert servers["off"]["batch_size_mean"] == 1.0 and servers["on"]["batch_size_mean"] >= 1.0  # batching off decodes one row at a time
    assert servers["on"]["served"]["/v1/chat/completions 200"] == 1 + 4 + 8  # the warm-up and every level, as the server counted them
    assert set(result["on_vs_off_tokens_per_s"]) == {"1", "4"} and result["summary"]["errors"] == 0
    assert result["greedy_agreement"]["prompts"] > 0
    assert result["machine"]["cpu_count"] >= 1 and result["settings"]["concurrency"] == [1, 4]
    written = json.loads((outputs_root / "bench" / "servebench.json").read_text())
    assert written["rows"] == json.loads(json.dumps(rows))
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith(("| on", "| off"))]
    assert len(table) == 4 and table[0].split(" | ")[6] == "1.00x"
    assert "batching on vs off, generated tokens/s: 1 client" in out


@pytest.mark.slow
def test_refused_requests_are_counted_as_errors_and_the_time_bound_ends_a_level(outputs_root):
    # 60 new tokens after a prompt of 25+ tokens overflow the tiny model's 64: every request is answered 400.
    save_run(outputs_root, "ppo", "default")
    argv = ["servebench.modes=off", "servebench.concurrency=2", "servebench.requests=100000", "servebench.level_timeout_s=1", "servebench.max_tokens=60", "servebench.warmup=1"]
    result = servebench.main([f"paths.root={outputs_root}", *argv])
    (row,) = result["rows"]
    assert row["stopped_by"] == "time" and 0 < row["requests"] < row["requests_planned"] and row["wall_s"] < 30
    assert row["errors"] == row["requests"] and row["completed"] == 0 and row["generated_tokens_per_s"] == 0
    assert row["latency_p50_s"] is None and row["error_messages"][0].startswith("HTTP 400: max_tokens: ")
    assert len(result["servers"][0]["warmup_errors"]) == 1 and result["summary"]["errors"] == row["errors"] + 1
    assert result["servers"][0]["exit_code"] == 0


@pytest.mark.parametrize(
    "argv, named",
    [
        (["servebench.clients=4"], "servebench.clients: unknown"),
        (["servebench.concurrency=1,0"], "servebench.concurrency=1,0"),
        (["servebench.concurrency=one"], "servebench.concurrency=one"),
        (["servebench.modes=on,maybe"], "servebench.modes=on,maybe"),
        (["servebench.requests=0"], "servebench.requests=0"),
        (["serve.port=8000"], "serve.port"),
        (["serve.host=0.0.0.0"], "serve.host=0.0.0.0"),
    ],
)
def test_bad_arguments_name_the_key(argv, named, outputs_root):
    with pytest.raises(UserError, match=named.replace(".", r"\.")):
        servebench.main(argv)


def test_a_bad_argument_exits_2_with_one_line(outputs_root):
    result = subprocess.run([sys.executable, "-m", "pipeline.tools.servebench", "servebench.concurrency=0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: servebench.concurrency=0") and "Traceback" not in result.stderr


def test_percentiles_interpolate_between_ranks():
    assert servebench.percentile([], 50) is None
    assert servebench.percentile([3.0], 99) == 3.0
    assert servebench.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert servebench.percentile(list(map(float, range(101))), 95) == 95.0
