"""`python -m pipeline stage=export`: a finished run as a Hugging Face `transformers` folder with its tokenizer.

    python -m pipeline stage=export                          # the newest finished ppo, else grpo, dpo, sft, pretrain run
    python -m pipeline stage=export init_from=outputs/sft/default export.out_dir=my_model
    python -m pipeline stage=sft init_from=path/to/hf_folder # any stage starts from a transformers folder

The mapping itself (GPT-2 or Llama, both ways) is pipeline/model/hf.py.

A LoRA run (peft=lora / qlora) is exported merged as above, and also in peft's own format inside the
same folder: `adapter/` (adapter_config.json + adapter_model.safetensors) and `base/` (its base model
as a transformers folder), for `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out/"base"), out/"adapter")`
(the mapping: pipeline/model/peft_format.py).

A quantised run (stage=quantize) is exported with its weights dequantised to float (quant/dequantized
in metrics.json): a plain transformers folder with the quantised values.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from pipeline import runs
from pipeline.files import write_json
from pipeline.model import GPT, quant
from pipeline.model.hf import export
from pipeline.stages import STAGES

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    started = time.time()
    model, tokenizer, payload, path = runs.load_start(cfg.init_from, STAGES["export"].starts_from, Path(cfg.paths.root), "export", run_name=run_dir.name)
    out_dir = Path(cfg.export.out_dir) if cfg.export.out_dir else run_dir / "hf"
    lora = payload.get("lora")
    if payload.get("kind") == "scalar":
        # Our score head has a bias; transformers' *ForSequenceClassification heads have none, so only the backbone goes.
        log.warning(
            "%s is a scalar (reward/value) model: exporting its backbone as a causal LM, without the score head%s",
            path, " (the peft adapter in adapter/ is the backbone's alone too)" if lora else "",
        )
    extra, lora_figures, quant_figures = None, {}, {}
    if quant.is_quantized(model):
        model, quant_figures = dequantized_for_export(model, path)
    if lora:
        extra, lora_figures = peft_export(payload, tokenizer, model, out_dir, str(cfg.export.dtype))
    figures = export(model, tokenizer, out_dir, dtype=str(cfg.export.dtype), extra=extra)
    metrics = {
        "stage": "export",
        "source": str(path),
        "source_stage": payload.get("stage"),
        "parents": runs.parent_record(init_from=path),
        "out_dir": str(out_dir),
        "model/params": model.num_params(),
        "time/total_s": time.time() - started,
        **lora_figures,
        **quant_figures,
        **figures,
    }
    log.info("exported %s to %s as %s (max logit difference %.2g)", path, out_dir, figures["architecture"], figures["check/max_abs_logit_diff"])
    if lora:
        log.info(
            "peft format: %s on %s (max logit difference against our LoRA model %.2g)",
            metrics["adapter_dir"], metrics["base_dir"], figures["check/adapter_max_abs_logit_diff"],
        )
    write_json(run_dir / runs.METRICS_FILE, metrics)
    return metrics


def dequantized_for_export(model: GPT, path: Path) -> tuple[GPT, dict]:
    """(the float model, what to record) for a quantised run: transformers gets its weights dequantised.

    The integers times their scales (and zeros), as floats: the quantised values, not the float model
    they were made from. A transformers folder of torchao tensors would need torchao to load and
    holds the CPU-specific int4 layout (pipeline/model/quant.py), so the folder stays a plain one;
    quant/max_abs_logit_diff says how far the float computation lands from the quantised one (int8
    also quantised the activations, which a float model does not).
    """
    settings = model.quant_settings
    plain = quant.dequantized(model)
    probe = torch.randint(0, model.config.vocab_size, (2, min(16, model.config.block_size)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((plain(probe) - model(probe).float()).abs().max())
    log.warning(
        "%s is %s-quantised: exporting its weights dequantised to float (transformers folders hold no torchao tensors); "
        "max logit difference against the quantised model %.2g",
        path, settings.method, diff,
    )
    return plain, {"quant/method": settings.method, "quant/settings": settings.to_dict(), "quant/dequantized": True, "quant/max_abs_logit_diff": diff}


def peft_export(payload: dict, tokenizer, merged: GPT, out_dir: Path, dtype: str):
    """(extra, figures) for hf.export: the fill that writes adapter/ and base/ into the export folder, and what to record of it."""
    from pipeline.model.lora import LoraSettings  # peft: imported only for LoRA runs
    from pipeline.model.peft_format import ADAPTER_DIR, BASE_DIR, write_peft_export

    info = payload["lora"]
    settings = LoraSettings.from_dict(info["settings"])
    base_path = Path(info["base"])
    # The base as merged_lora_payload built it (its digest was checked there): the run's config, the base's weights.
    base_payload = runs.load_model_payload(runs.model_file(base_path))
    base = runs.build_model({**base_payload, "config": payload["config"]}, GPT, base_path).eval()
    if settings.quantize is not None:
        log.info(
            "%s is a QLoRA run: %s holds its adapter for the float base in %s; load that base in 4 bit yourself "
            "(transformers' BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4')) to run it as it trained",
            payload.get("stage"), out_dir / ADAPTER_DIR, out_dir / BASE_DIR,
        )
    base_dir = (out_dir / BASE_DIR).resolve()

    def extra(folder: Path) -> dict:
        # payload["adapter_state_dict"]: the run file's own adapter tensors (a score head in it is left out)
        return write_peft_export(folder, base, payload["adapter_state_dict"], settings, tokenizer, dtype, merged=merged, base_model_name_or_path=str(base_dir))

    figures = {"adapter_dir": str(out_dir / ADAPTER_DIR), "base_dir": str(out_dir / BASE_DIR), "lora_base": str(base_path), "peft": "qlora" if settings.quantize else "lora"}
    return extra, figures
