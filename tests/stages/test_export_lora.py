"""`stage=export` of a LoRA run: the merged folder, and adapter/ + base/ in peft's own format; the run's W&B lineage.

One real LoRA SFT run (in-process, W&B offline, a few steps on a tiny grouped-query Llama-style
model) serves both: its export, and its offline run file's artifacts. The mapping itself is
tests/model/test_peft_format.py.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import logging

import pytest
import torch
from hydra import compose, initialize_config_dir
from peft import PeftModel
from transformers import AutoModelForCausalLM

import pipeline.__main__  # noqa: F401  (registers the run_name resolver the config uses)
from helpers import ARCHS, REPO, VOCAB, finished_run, tiny_model
from pipeline import runs
from pipeline.model import GPT, ScalarGPT
from pipeline.model.lora import LoraSettings, apply_lora
from pipeline.stages import STAGES
from pipeline.tokenizer import save_tokenizer
from wandb_records import artifacts, read_records, run_file

FEW_STEPS = ["trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "data.batch_size=8", "optim.lr=1e-2", "optim.warmup_steps=0"]


def config(root, run_dir, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.root={root}", f"paths.run_dir={run_dir}", f"paths.cache_dir={root / 'cache'}", *overrides])


def run_stage(stage, root, name, *overrides):
    run_dir = root / stage / name
    return STAGES[stage].module.run(config(root, run_dir, f"stage={stage}", *overrides), run_dir), run_dir


def logits(model, x):
    with torch.no_grad():
        out = model(input_ids=x) if not isinstance(model, GPT) else model.lm_head(model.hidden_states(x))
    return out.logits if hasattr(out, "logits") else out


def ids():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer):
    """(root, base run dir, LoRA SFT run dir): a base 'pretrain' run, then SFT with peft=lora and logger=wandb on it."""
    root = tmp_path_factory.mktemp("export_lora")
    rows = [{"prompt": f"Count to {n} ({i}):", "completion": " ".join(str(k) for k in range(1, n + 1))} for i in range(6) for n in range(1, 9)]
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = finished_run(root, "pretrain", "tiny", tiny_model(**ARCHS["llama-gqa"]), tokenizer)
    _, sft = run_stage("sft", root, "lora", "peft=lora", "logger=wandb", f"data.path={data}", f"init_from={base}", *FEW_STEPS)
    return root, base, sft


def test_export_of_a_lora_run_writes_merged_adapter_and_base(lora_run):
    root, base_run, sft = lora_run
    metrics, export_dir = run_stage("export", root, "lora", f"init_from={sft}")
    out = export_dir / "hf"
    assert metrics["architecture"] == "LlamaForCausalLM" and metrics["peft"] == "lora"
    assert metrics["lora_base"] == str((base_run / "model.pt").resolve())
    assert metrics["check/max_abs_logit_diff"] < 1e-5 and metrics["check/adapter_max_abs_logit_diff"] < 1e-5
    assert metrics["check/adapter_vs_merged_max_abs_logit_diff"] < 1e-4
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "adapter").iterdir()}
    assert (out / "base" / "config.json").is_file() and (out / "base" / "model.safetensors").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str((out / "base").resolve())

    merged = runs.build_model(runs.load_model_payload(runs.model_file(sft)), GPT).eval()
    plain = runs.build_model(runs.load_model_payload(runs.model_file(base_run)), GPT).eval()
    x = ids()
    ours = logits(merged, x)
    assert (ours - logits(plain, x)).abs().max() > 1e-3  # training moved the adapters: the comparisons below can fail
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out), x), ours, atol=1e-5, rtol=1e-5)
    hf_base = AutoModelForCausalLM.from_pretrained(out / "base")
    torch.testing.assert_close(logits(hf_base, x), logits(plain, x), atol=1e-5, rtol=1e-5)  # base/ is the base, unmerged
    peft_model = PeftModel.from_pretrained(hf_base, out / "adapter").eval()
    torch.testing.assert_close(logits(peft_model, x), ours, atol=1e-5, rtol=1e-5)

    # A plain run's export has no peft folders (and the same out_dir is replaced as a whole).
    metrics, _ = run_stage("export", root, "plain", f"init_from={base_run}", f"export.out_dir={out}")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [] and "check/adapter_max_abs_logit_diff" not in metrics


def test_a_lora_reward_model_exports_its_backbones_adapter_and_says_so(lora_run, tokenizer, caplog):
    root, base_run, _ = lora_run
    base = runs.build_model(runs.load_model_payload(runs.model_file(base_run)), ScalarGPT)  # a new score head
    reward = apply_lora(copy.deepcopy(base), LoraSettings(r=2, alpha=4.0, target_modules=("kv_proj", "up_proj")))
    with torch.no_grad():
        for name, p in reward.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    run_dir = root / "reward" / "handmade"
    save_tokenizer(tokenizer, run_dir / runs.TOKENIZER_DIR)
    runs.save_model(run_dir / runs.MODEL_FILE, reward, kind="scalar", stage="reward", base=base_run / runs.MODEL_FILE)
    (run_dir / runs.METRICS_FILE).write_text('{"stage": "reward"}')
    with caplog.at_level(logging.WARNING):
        metrics, export_dir = run_stage("export", root, "reward", f"init_from={run_dir}")
    assert any("without the score head" in r.message and "adapter" in r.message for r in caplog.records)
    out = export_dir / "hf"
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), out / "adapter").eval()
    torch.testing.assert_close(logits(peft_model, ids()), logits(reward.eval(), ids()), atol=1e-5, rtol=1e-5)
    assert metrics["check/adapter_max_abs_logit_diff"] < 1e-5


def test_a_qlora_runs_adapter_is_exported_for_its_float_base(lora_run, tokenizer, caplog):
    root, base_run, _ = lora_run
    base = runs.build_model(runs.load_model_payload(runs.model_file(base_run)), GPT)
    qlora = apply_lora(copy.deepcopy(base), LoraSettings(r=4, alpha=8.0, quantize="nf4"))
    with torch.no_grad():
        for name, p in qlora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    float_lora = apply_lora(copy.deepcopy(base), LoraSettings(r=4, alpha=8.0))
    float_lora.load_state_dict({k: v for k, v in qlora.state_dict().items() if ".lora_" in k}, strict=False)
    run_dir = root / "sft" / "qlora"
    save_tokenizer(tokenizer, run_dir / runs.TOKENIZER_DIR)
    runs.save_model(run_dir / runs.MODEL_FILE, qlora, kind="lm", stage="sft", base=base_run / runs.MODEL_FILE)
    (run_dir / runs.METRICS_FILE).write_text('{"stage": "sft"}')
    with caplog.at_level(logging.INFO, logger="pipeline.stages.export"):
        metrics, export_dir = run_stage("export", root, "qlora", f"init_from={run_dir}")
    assert any("QLoRA" in r.message and "load that base in 4 bit yourself" in r.message for r in caplog.records)
    assert metrics["peft"] == "qlora" and metrics["check/adapter_max_abs_logit_diff"] < 1e-5
    # The merged export is the QLoRA model (NF4 base dequantised); base/ + adapter/ is the adapter on the float base.
    assert metrics["check/adapter_vs_merged_max_abs_logit_diff"] > 1e-3
    out = export_dir / "hf"
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), out / "adapter").eval()
    torch.testing.assert_close(logits(peft_model, ids()), logits(float_lora.eval(), ids()), atol=1e-5, rtol=1e-5)


def md5_b64(path) -> str:
    """W&B's digest of a file in an artifact manifest: base64 of its MD5."""
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def test_a_lora_runs_wandb_artifact_is_its_adapter_and_its_base_is_an_input(lora_run):
    _, base_run, sft = lora_run
    records = read_records(run_file(sft))
    logged = {a.name: a for a in artifacts(records) if not a.use_after_commit}
    used = {a.name: a for a in artifacts(records) if a.use_after_commit}
    model = logged["sft-model-lora"]  # the stage's model.pt: the adapter file
    (entry,) = [e for e in model.manifest.contents if e.path == "model.pt"]
    adapter_size, base_size = (sft / "model.pt").stat().st_size, (base_run / "model.pt").stat().st_size
    assert entry.size == adapter_size and entry.digest == md5_b64(sft / "model.pt")
    assert adapter_size < base_size / 3, (adapter_size, base_size)  # r=8 on a 32-wide model: 28% here; far less on real widths
    metadata = json.loads(model.metadata)
    assert metadata["peft"] == "lora" and metadata["init_from"] == str(base_run / "model.pt")
    assert metadata["parents"]["init_from"]["sha256"] == runs.digest(base_run / "model.pt")
    # The base's model artifact as the run's input: its name, and its file byte for byte.
    assert list(used) == ["pretrain-model-tiny"]
    (base_entry,) = used["pretrain-model-tiny"].manifest.contents
    assert (base_entry.path, base_entry.digest, base_entry.size) == ("model.pt", md5_b64(base_run / "model.pt"), base_size)
