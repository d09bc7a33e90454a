"""The memory benchmark end to end on a tiny model: real stage processes, their memory.json in one table and one JSON."""

from __future__ import annotations

import json

import pytest

from pipeline.tokenizer import save_tokenizer
from pipeline.tools import membench

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=64"]
COLUMNS = ("trainable_params", "param_bytes", "grad_bytes", "optimizer_bytes", "param_optimizer_bytes", "param_grad_optimizer_bytes", "peak_rss_bytes", "step_s")


def count_to(n: int) -> str:
    return " ".join(str(k) for k in range(1, n + 1))


@pytest.mark.slow
def test_membench_runs_each_row_as_its_own_stage_and_reports_a_failed_row(outputs_root, tmp_path, tokenizer, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "sft.jsonl").write_text("".join(json.dumps({"prompt": f"Count to {n} ({i}):", "completion": count_to(n)}) + "\n" for i in range(8) for n in range(1, 9)))
    (data / "preference.jsonl").write_text("".join(json.dumps({"prompt": f"Count to {n} ({i}):", "chosen": count_to(n), "rejected": count_to(n + 1)}) + "\n" for i in range(8) for n in range(1, 9)))
    save_tokenizer(tokenizer, tmp_path / "tokenizer")
    # peft.r=0 reaches the LoRA row only (the others have no peft.r): that row fails, the bench goes on.
    result = membench.main(
        [*TINY, f"tokenizer.path={tmp_path / 'tokenizer'}", f"membench.data={data}", "membench.models=tiny", "membench.rows=ppo-full,sft-full,sft-lora"]
        + ["membench.checkpointing=false", "membench.steps=2", "membench.batch_size=4", "membench.new_tokens=4", "peft.r=0", "optim.matrices=adamw"]
    )
    rows = {r["row"]: r for r in result["rows"]}
    assert [r["row"] for r in result["rows"]] == ["sft-full", "sft-lora", "ppo-full"]  # the table's order
    assert "peft.r=0" in rows["sft-lora"]["error"] and not any(k in rows["sft-lora"] for k in COLUMNS)
    sft, ppo = rows["sft-full"], rows["ppo-full"]
    for r in (sft, ppo):
        assert "error" not in r, r.get("error")
        assert all(r[k] > 0 for k in COLUMNS) and not r["activation_checkpointing"]
        assert r["steps"] == 3 and len(r["step_s_all"]) == 2  # one untimed warm-up step
    model = sft["param_bytes"]
    assert sft["grad_bytes"] == model and 2 * model < sft["optimizer_bytes"] < 2 * model + 4 * 64  # two moments, a step per tensor
    head = 4 * (32 + 1)  # the critic's and the reward model's scalar heads
    assert ppo["param_bytes_by_module"] == {"actor": model, "reference": model, "critic": model + head, "reward_model": model + head}
    assert ppo["param_bytes"] == 4 * model + 2 * head and ppo["grad_bytes"] == 2 * model + head  # actor and critic train
    assert ppo["ratio_to_ppo_full"] == 1.0 and "ratio_to_ppo_full" not in sft
    assert result["models"]["tiny"] == sft["trainable_params"]
    written = json.loads((outputs_root / "bench" / "membench.json").read_text())
    assert written["rows"] == result["rows"]
    assert not list((outputs_root / "bench").glob("membench-*"))  # the throwaway chain is gone
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny")]
    assert len(table) == 3 and "failed: " in table[1] and table[2].endswith("| 100.0% |")
