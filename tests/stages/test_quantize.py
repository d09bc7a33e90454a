"""`python -m pipeline stage=quantize`: torchao's numbers, the file and its reload, the readers (generate, export), bad input.

The gold check needs a model that scores: `trained` is a tiny GPT that has memorised the embedded
task's reference answers to 16 of its held-out prompts (a few seconds of full-batch AdamW), so its
float gold score is near 1 and its greedy answers are confident; an untrained model scores about 0
either way and its near-flat logits flip under any rounding, which would test nothing.
"""

from __future__ import annotations

import copy
import json
import runpy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import pipeline.__main__  # noqa: F401  (registers the run_name resolver the config uses)
from helpers import REPO, finished_run, tiny_model
from pipeline import runs
from pipeline.checks import check_config
from pipeline.data.chat import encode_conversation
from pipeline.errors import UserError
from pipeline.evaluate import complete, gold_eval
from pipeline.files import load_tensors, read_json
from pipeline.model import GPT, GPTConfig, ScalarGPT, generate, left_pad, pad_vocab, quant
from pipeline.model.engine import DecodeBatch
from pipeline.stages import STAGES
from pipeline.stages import export as export_stage
from pipeline.stages import generate as generate_stage
from pipeline.stages import quantize as quantize_stage
from pipeline.tasks import default_task
from pipeline.tokenizer import save_tokenizer, train_tokenizer

METHODS = {"int8": quant.QuantSettings("int8"), "int4": quant.QuantSettings("int4", 32, "bfloat16")}
GOLD_MARGIN = 0.1  # the quantised model's gold score is at most this far below the float one's
AGREEMENT = 0.9  # and at least this share of its greedy answers are the float model's, word for word
FAST = ["quantize.bench.batch_sizes=[1,2]", "quantize.bench.new_tokens=4", "quantize.bench.warmup=0", "quantize.bench.repeats=1", "eval.max_new_tokens=24", "eval.batch_size=16"]


@pytest.fixture(scope="module")
def trained():
    """(model, tokenizer, prompts): a tied tiny GPT trained to answer 16 held-out task prompts with their references."""
    rows = default_task().sft_rows("test", 16, habit=0.0)
    tokenizer = train_tokenizer([m["content"] for r in rows for m in r["messages"]] * 4, 300)
    seqs = [encode_conversation(tokenizer, r["messages"], 0, "all")[0] for r in rows]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=pad_vocab(len(tokenizer)), block_size=96, n_layer=2, n_head=2, n_embd=32))
    T = max(map(len, seqs))
    x = torch.full((len(seqs), T), tokenizer.pad_token_id)
    y = torch.full((len(seqs), T), -100)
    for i, s in enumerate(seqs):
        x[i, : len(s)], y[i, : len(s) - 1] = torch.tensor(s), torch.tensor(s[1:])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(120):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer, [r["messages"][:1] for r in rows]


def probe(vocab: int, n: int = 2, length: int = 20) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(1))


def config(root: Path, run_dir: Path, stage: str, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"stage={stage}", f"paths.root={root}", f"paths.run_dir={run_dir}", *overrides])
    check_config(cfg)
    return cfg


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_quantised_model_computes_what_torchao_quantize_builds(method, trained):
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model, settings = trained[0], METHODS[method]
    ours = quant.quantize_model(copy.deepcopy(model), settings)
    reference = copy.deepcopy(model)
    quant.cast_weights(reference, settings.torch_dtype)
    torchao_config = Int8DynamicActivationInt8WeightConfig() if method == "int8" else PrototypeInt4WeightOnlyConfig(group_size=settings.group_size)
    quantize_(reference, torchao_config, filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and name.startswith("blocks."))
    ids = probe(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(ours(ids), reference(ids))
    assert len(ours.quant_state) == 2 * len(quant.PROJECTIONS)  # every projection of both blocks; the tied head stays the embedding
    assert ours.lm_head.weight is ours.wte.weight and ours.wte.weight.dtype == settings.torch_dtype


@pytest.mark.parametrize("method", sorted(METHODS))
def test_save_and_load_give_equal_logits_from_a_smaller_file_of_plain_tensors(method, trained, tmp_path):
    model, settings = trained[0], METHODS[method]
    quantised = quant.quantize_model(copy.deepcopy(model), settings)
    runs.save_model(tmp_path / "float.pt", model, kind="lm", stage="sft")
    runs.save_model(tmp_path / "quant.pt", quantised, kind="lm", stage="sft", extra={"source": "somewhere/model.pt"})
    assert (tmp_path / "quant.pt").stat().st_size < (tmp_path / "float.pt").stat().st_size / (2 if method == "int8" else 3)
    raw = load_tensors(tmp_path / "quant.pt")  # weights_only: tensors and plain types, nothing that could run code
    assert raw["format"] == 2 and raw["stage"] == "sft" and raw["quant"]["settings"] == settings.to_dict()
    assert {t.dtype for plain in raw["quant_state"].values() for t in plain.values()} <= {torch.int8, torch.uint8, torch.float32, torch.bfloat16}
    payload = runs.load_model_payload(tmp_path / "quant.pt")
    loaded = runs.build_model(payload, GPT, tmp_path / "quant.pt")
    ids = probe(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded(ids), quantised(ids))
        assert (loaded(ids).float() - model(ids)).norm() < 0.2 * model(ids).norm()  # quantised, not garbled
    assert quant.is_quantized(loaded) and loaded.new_kv_cache(1, 4).k.dtype == settings.torch_dtype
    with pytest.raises(UserError, match="quantised language model: it cannot be loaded as a ScalarGPT"):
        runs.build_model(payload, ScalarGPT, tmp_path / "quant.pt")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_kv_cache_paths_compute_what_a_full_forward_computes(method, trained):
    """generate's prefill + decode steps and the server's DecodeBatch (join, step) against one forward over the whole sequence."""
    model, tokenizer, prompts = trained
    quantised = quant.quantize_model(copy.deepcopy(model), METHODS[method])
    ids, mask = left_pad([encode_conversation(tokenizer, p, 0, "all")[0] for p in prompts[:3]], tokenizer.pad_token_id)
    out = generate(quantised, ids, mask, max_new_tokens=5, temperature=0.0, pad_id=tokenizer.pad_token_id)
    full = torch.cat([ids, out.tokens], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(out.tokens)], dim=1)
    with torch.no_grad():
        logits = quantised(full, attention_mask=full_mask).float()
    T = ids.size(1)
    assert torch.equal(out.tokens, logits[:, T - 1 : -1].argmax(-1))  # each greedy token is the full forward's argmax
    # Not bit for bit: another batch shape rounds the floats differently, and rounding activations to int8 levels
    # (int8) or to bfloat16 (int4) can turn such a difference into a step of one level.
    tol = 0.02 * float(logits.abs().max())
    batch = DecodeBatch(quantised)
    rows = [[int(t) for t, m in zip(r, rm) if m] for r, rm in zip(ids, mask)]
    batch.join(rows, rows=list(range(len(rows))))
    assert (batch.logits.float() - logits[:, T - 1]).abs().max() < tol
    batch.step(out.tokens[:, 0])
    assert (batch.logits.float() - logits[:, T]).abs().max() < tol


def test_int4_leaves_a_layer_float_whose_width_is_not_a_multiple_of_the_group_and_quantises_an_untied_head(tmp_path):
    model = tiny_model(tie_embeddings=False)  # n_embd 32: the attention and up projections read 32 inputs, down_proj 128
    quantised = quant.quantize_model(copy.deepcopy(model), quant.settings_for("int4", 64, "auto", tied=False))
    assert sorted(quantised.quant_state) == ["blocks.0.mlp.down_proj", "blocks.1.mlp.down_proj"]
    assert "lm_head" in quant.record(quantised)["float_modules"]
    untied = quant.quantize_model(copy.deepcopy(model), quant.settings_for("int8", 32, "auto", tied=False))
    assert "lm_head" in untied.quant_state and untied.lm_head.weight is not untied.wte.weight
    runs.save_model(tmp_path / "model.pt", untied, kind="lm", stage="pretrain")
    loaded = runs.build_model(runs.load_model_payload(tmp_path / "model.pt"), GPT, tmp_path / "model.pt")
    ids = probe(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded(ids), untied(ids))
        assert (quant.dequantized(loaded)(ids) - model(ids)).abs().max() < 0.5  # the float weights the integers stand for


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_stage_then_generate_and_export_read_its_run(method, trained, outputs_root, monkeypatch):
    model, tokenizer, prompts = trained
    source = finished_run(outputs_root, "sft", "default", model, tokenizer)
    # The embedded task's held-out prompts as the gold set would be prompts this model never saw: give it its own.
    monkeypatch.setattr(quantize_stage, "gold_prompts", lambda cfg: prompts)
    run_dir = outputs_root / "quantize" / method
    metrics = quantize_stage.run(config(outputs_root, run_dir, "quantize", f"quantize.method={method}", *FAST), run_dir)

    assert metrics == read_json(run_dir / runs.METRICS_FILE) and runs.is_finished(run_dir)
    assert metrics["source"] == str(source / runs.MODEL_FILE) and metrics["source_stage"] == "sft" and metrics["method"] == method
    assert metrics["file/quant_bytes"] == (run_dir / runs.MODEL_FILE).stat().st_size < metrics["file/float_bytes"]
    assert metrics["file/float_bytes"] == (source / runs.MODEL_FILE).stat().st_size  # a plain run: its own file
    assert metrics["check/reload_max_abs_logit_diff"] == 0.0
    for b in (1, 2):
        assert metrics[f"perf/float_tokens_per_s_b{b}"] > 0 and metrics[f"perf/quant_tokens_per_s_b{b}"] > 0
    assert metrics["gold/float"] > 0.8  # the model scores: the margin below means something
    assert metrics["gold/quant"] >= metrics["gold/float"] - GOLD_MARGIN and metrics["gold/agreement"] >= AGREEMENT
    assert len(json.loads((run_dir / quantize_stage.ANSWERS_FILE).read_text())) == len(prompts)
    # A finished quantize run is never a default source: the float model stays what generate, export and serve take.
    for reader in ("generate", "export", "serve"):
        assert "quantize" not in STAGES[reader].starts_from
    assert runs.resolve_start(None, STAGES["generate"].starts_from, outputs_root, "generate") == source / runs.MODEL_FILE

    prompts_file = outputs_root / "prompts.txt"
    prompts_file.write_text(prompts[0][0]["content"] + "\n")
    gen_dir = outputs_root / "generate" / method
    generate_stage.run(config(outputs_root, gen_dir, "generate", f"init_from={run_dir}", f"prompts_file={prompts_file}", "max_new_tokens=24"), gen_dir)
    (row,) = [json.loads(line) for line in (gen_dir / generate_stage.GENERATIONS_FILE).read_text().splitlines()]
    loaded, tok, _, _ = runs.load_start(str(run_dir), (), outputs_root, "generate")
    assert row["prompt"] == prompts[0]  # the source was SFT: asked through the chat template
    assert row["response"] == complete(loaded, tok, [prompts[0]], max_new_tokens=24)[0]

    from transformers import AutoModelForCausalLM

    export_dir = outputs_root / "export" / method
    exported = export_stage.run(config(outputs_root, export_dir, "export", f"init_from={run_dir}"), export_dir)
    assert exported["quant/dequantized"] is True and exported["quant/method"] == method and exported["source_stage"] == "sft"
    hf = AutoModelForCausalLM.from_pretrained(export_dir / "hf").eval()
    ids = probe(model.config.vocab_size)
    with torch.no_grad():
        assert (hf(ids).logits - quant.dequantized(loaded)(ids)).abs().max() < 1e-4


def test_a_quantised_start_is_refused_to_training_stages_and_to_quantize(trained, outputs_root):
    model, tokenizer, _ = trained
    source = finished_run(outputs_root, "sft", "default", model, tokenizer)
    run_dir = outputs_root / "quantize" / "default"
    runs.save_model(run_dir / runs.MODEL_FILE, quant.quantize_model(copy.deepcopy(model), METHODS["int8"]), kind="lm", stage="sft", extra={"source": str(source)})
    save_tokenizer(tokenizer, run_dir / runs.TOKENIZER_DIR)
    for stage in ("sft", "ppo", "dpo", "grpo"):
        with pytest.raises(UserError, match=f"is a quantised model \\(int8, stage=quantize\\): stage '{stage}' trains.*start from {source}"):
            runs.load_start(str(run_dir), STAGES[stage].starts_from, outputs_root, stage)
    with pytest.raises(UserError, match="quantised already \\(int8\\)"):
        quantize_stage.load_float(config(outputs_root, outputs_root / "q2", "quantize", f"init_from={run_dir}"), outputs_root / "q2")


def test_the_quantised_model_keeps_its_gold_score_within_the_margin(trained):
    model, tokenizer, prompts = trained
    floating, float_rows = gold_eval(model, tokenizer, prompts, 24)
    assert floating > 0.8
    for method, settings in METHODS.items():
        score, rows = gold_eval(quant.quantize_model(copy.deepcopy(model), settings), tokenizer, prompts, 24)
        agreement = sum(a["response"] == b["response"] for a, b in zip(float_rows, rows)) / len(rows)
        assert score >= floating - GOLD_MARGIN and agreement >= AGREEMENT, (method, score, floating, agreement)


@pytest.mark.parametrize(
    "override, words",
    [
        ("quantize.method=int3", "quantize.method=int3: must be int8 or int4"),
        ("quantize.group_size=48", "quantize.group_size=48: must be one of 32, 64, 128"),
        ("quantize.bench.batch_sizes=[]", "quantize.bench.batch_sizes=[]: must be a non-empty list of integers >= 1"),
    ],
)
def test_bad_settings_exit_with_code_2_and_name_the_key(override, words, outputs_root, monkeypatch, capfd):
    """Through the entry point in this process (as tests/test_bad_input.py runs its rows): one error line, exit code 2, nothing run."""
    monkeypatch.setattr(sys, "argv", ["pipeline", "stage=quantize", override])
    capfd.readouterr()
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exited:
        warnings.filterwarnings("ignore", message="'pipeline.__main__' found in sys.modules")
        runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert exited.value.code == 2 and len(lines) == 1 and words in lines[0] and "Traceback" not in err, err
    assert not (outputs_root / "quantize").exists() or not any((outputs_root / "quantize").rglob(runs.MODEL_FILE))
