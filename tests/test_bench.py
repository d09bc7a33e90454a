"""The benchmark command at CI size: both sides run and the figures land in bench.json."""

from __future__ import annotations

from pipeline import bench


def test_bench_smoke(outputs_root):
    result = bench.main(["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "data.seq_len=32", "bench.batch_size=4", "bench.steps=3", "bench.warmup=1"])
    assert result["ours_tokens_per_s"] > 0 and result["plain_loop_tokens_per_s"] > 0
    assert result["ratio_ours_over_plain"] == result["ours_tokens_per_s"] / result["plain_loop_tokens_per_s"]
    assert (outputs_root / "bench" / "bench.json").is_file()
