"""peft=lora / qlora through the stages: adapters trained, saved with their base's digest, read back merged.

One finished base run (a tiny model), then SFT with LoRA and with QLoRA; from the LoRA SFT run a
LoRA reward model, LoRA DPO and LoRA GRPO; then LoRA PPO on one shared base: each a real
`python -m pipeline` process on small data.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import REPO, finished_run, tiny_model
from pipeline import runs
from pipeline.data.collators import PairCollator
from pipeline.errors import UserError
from pipeline.model import GPT
from pipeline.model.lora import LoraSettings, apply_lora
from pipeline.stages.dpo import DPOCollator, DPOModule

SMALL = ["logger=csv", "trainer.max_steps=12", "trainer.val_check_interval=6", "data.batch_size=8", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1"]


def count_to(n: int) -> str:
    return " ".join(str(k) for k in range(1, n + 1))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def start(root, *args) -> subprocess.Popen:
    env = {**__import__("os").environ, "PIPELINE_OUTPUTS": str(root), "WANDB_MODE": "offline"}
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_all(*procs) -> None:
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]


def only_run(root, stage):
    (run,) = [d for d in (root / stage).iterdir() if d.is_dir()]
    return run


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tokenizer):
    """{name: run dir} of base, sft_lora, sft_qlora, reward_lora, dpo_lora; LoRA SFT and QLoRA SFT run at once, then reward and DPO."""
    d = tmp_path_factory.mktemp("lora")
    sft = write_jsonl(d / "sft.jsonl", [{"prompt": f"Count to {n} ({i}):", "completion": count_to(n)} for i in range(12) for n in range(1, 9)])
    prefs = write_jsonl(d / "prefs.jsonl", [{"prompt": f"Count to {n} ({i}):", "chosen": count_to(n), "rejected": count_to(n + 1)} for i in range(8) for n in range(1, 9)])
    base = finished_run(d / "base", "pretrain", "tiny", tiny_model(), tokenizer)
    cache = d / "cache"
    roots = {name: d / name for name in ("sft_lora", "sft_qlora", "reward_lora", "dpo_lora", "grpo_lora")}
    (d / "short.py").write_text("def short(prompts, completions, **kwargs):\n    return [-len(c) / 10 for c in completions]\n")
    grpo = ["grpo.iterations=4", "grpo.prompts_per_rollout=4", "grpo.group_size=4", "grpo.minibatch_size=2", "grpo.max_new_tokens=6", "grpo.eval_every=2", "grpo.eval_prompts=4", "grpo.save_every=2"]
    common = [f"paths.cache_dir={cache}", *SMALL]
    wait_all(
        start(roots["sft_lora"], "stage=sft", "peft=lora", f"data.path={sft}", f"init_from={base}", *common),
        start(roots["sft_qlora"], "stage=sft", "peft=qlora", f"data.path={sft}", f"init_from={base}", *common),
    )
    sft_lora = only_run(roots["sft_lora"], "sft")
    wait_all(
        start(roots["reward_lora"], "stage=reward", "peft=lora", f"data.path={prefs}", f"init_from={sft_lora}", *common),
        start(roots["dpo_lora"], "stage=dpo", "peft=lora", "dpo.reference=online", f"data.path={prefs}", f"init_from={sft_lora}", "eval.num_prompts=4", "eval.max_new_tokens=4", *common),
        start(roots["grpo_lora"], "stage=grpo", "peft=lora", f"grpo.reward={d / 'short.py'}:short", f"data.path={prefs}", f"init_from={sft_lora}", *grpo, f"paths.cache_dir={cache}", "logger=csv"),
    )
    ppo = ["ppo.iterations=2", "ppo.rollout_batch_size=8", "ppo.minibatch_size=4", "ppo.max_new_tokens=4", "ppo.eval_every=2", "ppo.eval_prompts=4", "ppo.save_every=2"]
    reward_lora = only_run(roots["reward_lora"], "reward")
    roots["ppo_lora"] = d / "ppo_lora"
    wait_all(start(roots["ppo_lora"], "stage=ppo", "peft=lora", f"data.path={prefs}", f"init_from={sft_lora}", f"reward_from={reward_lora}", *ppo, f"paths.cache_dir={cache}", "logger=csv"))
    return {
        "ppo_lora": only_run(roots["ppo_lora"], "ppo"),
        "base": base,
        "sft_lora": sft_lora,
        "sft_qlora": only_run(roots["sft_qlora"], "sft"),
        "reward_lora": reward_lora,
        "dpo_lora": only_run(roots["dpo_lora"], "dpo"),
        "grpo_lora": only_run(roots["grpo_lora"], "grpo"),
    }


def test_a_lora_run_saves_only_its_adapter_and_reads_back_as_a_plain_model(chain):
    run = chain["sft_lora"]
    saved = torch.load(run / "model.pt", weights_only=True)
    assert saved["lora"]["settings"]["r"] == 8 and saved["lora"]["settings"]["quantize"] is None
    assert saved["lora"]["base"] == str((chain["base"] / "model.pt").resolve()) or saved["lora"]["base"] == str(chain["base"].resolve())
    assert saved["state_dict"] and all(".lora_" in k for k in saved["state_dict"])  # no base weights in the file
    assert (run / "model.pt").stat().st_size < (chain["base"] / "model.pt").stat().st_size / 2
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(".lora_" in k for k in checkpoint["state_dict"])  # the frozen base stays out of the checkpoints too
    assert json.loads((run / "metrics.json").read_text())["peft"] == "lora"

    payload = runs.load_model_payload(runs.model_file(run))
    base = runs.load_model_payload(runs.model_file(chain["base"]))
    assert set(payload["state_dict"]) == set(base["state_dict"])  # merged: the keys of a plain GPT
    changed = [k for k in base["state_dict"] if not torch.equal(payload["state_dict"][k], base["state_dict"][k])]
    assert changed and all(".attn." in k or ".mlp." in k for k in changed)  # only the adapted projections moved


def test_a_lora_adapter_refuses_a_changed_base(chain, tokenizer, tmp_path):
    run = chain["sft_lora"]
    saved = torch.load(run / "model.pt", weights_only=True)
    other = finished_run(tmp_path, "pretrain", "other", tiny_model(seed=5), tokenizer)
    saved["lora"]["base"] = str(other / "model.pt")
    moved = tmp_path / "moved.pt"
    torch.save(saved, moved)
    (tmp_path / "tokenizer").symlink_to(run / "tokenizer")
    with pytest.raises(UserError, match="digest mismatch"):
        runs.load_model_payload(moved)
    saved["lora"]["base"] = str(tmp_path / "gone")
    torch.save(saved, moved)
    with pytest.raises(UserError, match="not there any more"):
        runs.load_model_payload(moved)


def test_qlora_sft_trains_adapters_on_a_4bit_base(chain):
    run = chain["sft_qlora"]
    saved = torch.load(run / "model.pt", weights_only=True)
    assert saved["lora"]["settings"]["quantize"] == "nf4"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["peft"] == "qlora" and metrics["val/loss"] < 20
    merged = runs.load_model_payload(runs.model_file(run))
    model = runs.build_model(merged, GPT)
    logits = model(torch.randint(0, model.config.vocab_size, (2, 10)))
    assert torch.isfinite(logits).all()


def test_a_lora_reward_model_keeps_its_trained_head_and_loads_merged(chain):
    saved = torch.load(chain["reward_lora"] / "model.pt", weights_only=True)
    assert saved["kind"] == "scalar" and {"score_head.weight", "score_head.bias"} <= set(saved["state_dict"])
    assert saved["lora"]["base"] == str((chain["sft_lora"] / "model.pt").resolve())  # the base is the (LoRA) SFT run, itself merged on reading
    payload = runs.load_model_payload(runs.model_file(chain["reward_lora"]))
    assert torch.equal(payload["state_dict"]["score_head.weight"], saved["state_dict"]["score_head.weight"])
    assert not any(".lora_" in k for k in payload["state_dict"])


def test_lora_dpo_runs_against_the_policy_with_its_adapters_off(chain):
    metrics = json.loads((chain["dpo_lora"] / "metrics.json").read_text())
    assert metrics["peft"] == "lora" and metrics["reference"] == "online"
    assert metrics["final/kl"] >= 0 and 0 <= metrics["val/rewards/accuracies"] <= 1


def test_lora_grpo_holds_no_reference_copy_and_checkpoints_its_adapters(chain):
    run = chain["grpo_lora"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train/iterations"] == 4 and metrics["final/kl"] >= 0
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"] and all(k.startswith("actor.") and ".lora_" in k for k in checkpoint["state_dict"])  # no reference weights
    saved = torch.load(run / "model.pt", weights_only=True)
    assert saved["lora"]["base"] == str((chain["sft_lora"] / "model.pt").resolve())


def test_the_shared_reference_is_exactly_a_separate_copy_of_the_base():
    """DPO's loss with the reference as the adapters switched off equals the loss with a frozen copy of the base, after training moved the adapters."""
    from helpers import tiny_model as make

    base = make()
    config = base.config.to_dict()
    dpo = {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "sft_coef": 0.0, "reference": "online"}
    optim = {"lr": 1e-2, "weight_decay": 0.0, "betas": [0.9, 0.95], "warmup_steps": 0, "min_lr_ratio": 1.0}
    shared = DPOModule(config, optim, 10, dpo, shared_reference=True)
    assert shared.reference is None  # no second copy
    shared.model.load_state_dict(base.state_dict())
    apply_lora(shared.model, LoraSettings(r=4, alpha=8))
    with torch.no_grad():  # a trained adapter: B away from zero
        for name, p in shared.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    copied = DPOModule(config, optim, 10, dpo)
    copied.model = shared.model
    copied.reference.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(0)
    rows = []
    for key in range(3):
        prompt = torch.randint(2, 100, (5,), generator=g).tolist()
        answers = [prompt + torch.randint(2, 100, (4,), generator=g).tolist() for _ in range(3)]
        rows += [{"chosen_ids": answers[i], "rejected_ids": answers[j], "prompt_len": 5, "prompt_key": key, "margin": 0.0, "gold_sign": 0.0} for i, j in ((0, 1), (0, 2), (1, 2))]
    batch = DPOCollator(0, share_prompts=True)(rows)
    loss_shared, figures_shared = shared.step(batch)
    loss_copied, figures_copied = copied.step(batch)
    assert torch.equal(loss_shared, loss_copied)
    assert torch.equal(figures_shared["rewards/margins"], figures_copied["rewards/margins"])
    assert float(figures_shared["rewards/margins"].abs().max()) > 0  # the adapter moved the policy off its reference
    assert isinstance(PairCollator, type)


def test_a_lora_run_resumes_exactly_from_a_checkpoint_of_its_adapters(tmp_path):
    """8 steps straight == killed after step 5, resumed from the step-4 checkpoint (adapters only) in a module built afresh on the same base."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from helpers import tiny_model as make
    from pipeline.training import Batches, ExactResume, LanguageModelModule, TrainedOnly

    base = make()
    blocks = [{"input_ids": row} for row in torch.randint(0, base.config.vocab_size, (48, 17), generator=torch.Generator().manual_seed(3))]
    optim = {"lr": 1e-2, "weight_decay": 0.0, "betas": [0.9, 0.95], "warmup_steps": 2, "min_lr_ratio": 0.1}

    class Killed(Exception):
        pass

    class Module(LanguageModelModule):
        stop_at = None

        def training_step(self, batch, batch_idx):
            if self.global_step == self.stop_at:
                raise Killed
            return super().training_step(batch, batch_idx)

    def fit(ckpt_dir, stop_at=None, ckpt=None, seed=0):
        pl.seed_everything(seed, verbose=False)
        m = Module(base.config.to_dict(), optim, 8)
        m.stop_at = stop_at
        m.model.load_state_dict(base.state_dict())
        apply_lora(m.model, LoraSettings(r=4, alpha=8, dropout=0.2))  # adapter dropout: the generators matter
        m.strict_loading = False
        trainer = pl.Trainer(
            accelerator="cpu", max_steps=8, logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=4), TrainedOnly(m, "model."), ExactResume()],
        )
        try:
            trainer.fit(m, datamodule=Batches(blocks, blocks[:8], 8, seed=0), ckpt_path=ckpt, weights_only=True)
        except Killed:
            pass
        return m

    straight = fit(tmp_path / "whole")
    fit(tmp_path / "killed", stop_at=5)
    last = tmp_path / "killed" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 4 and checkpoint["state_dict"] and all(".lora_" in k for k in checkpoint["state_dict"])
    resumed = fit(tmp_path / "killed", ckpt=str(last), seed=123)  # the resumed process's own seed must not matter
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert float(a["blocks.0.attn.q_proj.lora_B.default.weight"].abs().max()) > 0  # the adapters trained


def test_lora_ppo_runs_its_four_models_on_one_base(chain):
    run = chain["ppo_lora"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["peft"] == "lora" and metrics["ppo/shared_base"] is True and metrics["train/iterations"] == 2
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    names = set(checkpoint["state_dict"])
    assert any(".lora_A.critic." in k for k in names) and any(".lora_A.default." in k for k in names) and "critic.score_head.weight" in names
    assert not any(".reward." in k or "base_layer" in k or k.startswith("reward_model.") for k in names)  # frozen: loaded again on resume
    saved = torch.load(run / "model.pt", weights_only=True)
    assert saved["lora"]["base"] == str((chain["sft_lora"] / "model.pt").resolve())
    assert saved["state_dict"] and all(".lora_" in k and ".default." in k for k in saved["state_dict"])  # the policy's adapter alone
