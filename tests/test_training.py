"""The shared Lightning plumbing: the history.jsonl every stage run writes for the report."""

from __future__ import annotations

from pipeline.training import History, history_series, read_history


def test_history_appends_and_a_resumed_run_overrides_the_steps_it_logs_again(tmp_path):
    path = tmp_path / "history.jsonl"
    killed = History(path)
    for step in range(1, 8):
        killed.log_metrics({"train/loss": 10.0 - step, "epoch": 0}, step=step)
        if step == 4:
            killed.log_metrics({"val/loss": 3.5}, step=4)
    with path.open("a") as f:
        f.write('{"step": 8, "train/lo')  # the kill tears the last line
    assert len(read_history(path)) == 8 and all("epoch" not in r for r in read_history(path))

    resumed = History(path)  # resumes from the checkpoint of step 4: steps 5.. are trained and logged again
    for step in range(5, 9):
        resumed.log_metrics({"train/loss": 1.0 / step}, step=step)
    rows = read_history(path)
    assert len(rows) == 12  # nothing rewritten, the torn line skipped
    assert history_series(rows, "train/loss") == ([1, 2, 3, 4, 5, 6, 7, 8], [9.0, 8.0, 7.0, 6.0, 0.2, 1 / 6, 1 / 7, 0.125])
    assert history_series(rows, "val/loss") == ([4], [3.5])



def test_grouped_sampler_pads_less_keeps_groups_together_and_still_shuffles_every_row_once():
    import random

    from pipeline.data.samplers import GroupedSampler

    rng = random.Random(0)
    lengths = [rng.randint(5, 80) for _ in range(1000)]
    batch = 16
    sampler = GroupedSampler(batch, lengths, seed=3)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == list(range(1000)) and sorted(second) == list(range(1000))  # every row once per epoch
    assert first != second  # a new order each epoch

    def padded(order):  # tokens after padding each full batch to its longest row
        full = len(order) // batch * batch
        return sum(batch * max(lengths[i] for i in order[s : s + batch]) for s in range(0, full, batch))

    shuffled = list(range(1000))
    random.Random(1).shuffle(shuffled)
    assert padded(first) < 0.7 * padded(shuffled)
    # batches are not sorted globally: long and short batches alternate at random
    widths = [max(lengths[i] for i in first[s : s + batch]) for s in range(0, 992, batch)]
    assert widths != sorted(widths, reverse=True) and widths != sorted(widths)
    assert list(GroupedSampler(batch, lengths, seed=3)) == first  # the seed fixes the order

    # groups of up to 6 rows (a prompt's K-wise pairs) stay next to each other, in a shuffled order of groups
    groups = [i // 6 for i in range(996)]
    order = list(GroupedSampler(batch, lengths[:996], groups, seed=1))
    assert sorted(order) == list(range(996))
    per_batch = [len({groups[i] for i in order[s : s + batch]}) for s in range(0, 992, batch)]
    assert max(per_batch) <= 4  # a batch of 16 is a slice of whole groups of 6: at most 4 of them, cut at its edges
    assert [groups[i] for i in order[::6]] != sorted(groups[i] for i in order[::6])  # groups come in a shuffled order
    unsorted = list(GroupedSampler(batch, None, groups, seed=1))  # no lengths: groups kept together, no sorting by width
    assert sorted(unsorted) == list(range(996)) and max(len({groups[i] for i in unsorted[s : s + batch]}) for s in range(0, 992, batch)) <= 4


# -- the schedule and the divergence guard ----------------------------------------------------------


def lm_trainer(tmp_path, **kw):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pipeline.training import FiniteGuard

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=1)
    return pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=str(tmp_path), callbacks=[checkpoint, FiniteGuard("pretrain")], **kw,
    )


def lm_module(max_steps: int, **optim_options):
    import torch

    from pipeline.model import GPTConfig
    from pipeline.training import LanguageModelModule

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16).to_dict()
    optim = {"lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.95], "warmup_steps": 2, "min_lr_ratio": 0.1, **optim_options}
    return LanguageModelModule(config, optim, max_steps=max_steps)


def lm_batches(n: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader([{"input_ids": torch.randint(0, 64, (9,), generator=g)} for _ in range(n)], batch_size=2)


def test_with_max_steps_minus_one_the_schedule_spans_the_epochs(tmp_path):
    module = lm_module(max_steps=-1)
    trainer = lm_trainer(tmp_path, max_epochs=2, max_steps=-1)
    trainer.fit(module, lm_batches(10))  # 5 steps an epoch, 10 in all
    assert trainer.global_step == 10
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    # Cosine from 1e-3 after 2 warm-up steps to the floor (0.1 x) at step 10: half way down at step 6.
    factor = scheduler.lr_lambdas[0]
    assert abs(factor(6) - (0.1 + 0.9 * 0.5)) < 1e-9 and abs(factor(10) - 0.1) < 1e-9 and factor(3) > 0.9


def test_a_non_finite_gradient_stops_the_stage_before_it_spoils_the_last_checkpoint(tmp_path):
    import pytest
    import torch

    from pipeline.errors import UserError

    module = lm_module(max_steps=8)
    real_loss = module.loss
    module.loss = lambda batch: real_loss(batch) * (float("nan") if module.global_step == 3 else 1.0)
    with pytest.raises(UserError, match=r"pretrain diverged at step 3: non-finite gradients; the last good checkpoint is kept"):
        lm_trainer(tmp_path, max_steps=8).fit(module, lm_batches(16))
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    assert all(torch.isfinite(p).all() for p in module.parameters())  # the optimiser never took the NaN step


def test_muon_takes_the_blocks_weight_matrices_and_adamw_the_rest():
    from omegaconf import OmegaConf

    from pipeline.training import OptimizerChain, adamw_with_schedule

    module = lm_module(max_steps=4)
    options = {**module.hparams.optim, "matrices": "muon"}
    optimizer = adamw_with_schedule(module.model, OmegaConf.create(options), 4)["optimizer"]
    assert isinstance(optimizer, OptimizerChain)
    muon, adamw = optimizer.optimizers
    names = {id(p): n for n, p in module.model.named_parameters()}
    muon_names = sorted(names[id(p)] for g in muon.param_groups for p in g["params"])
    # One block: queries, keys/values, the attention's and the MLP's projections; never the (tied) embedding or a gain.
    assert muon_names == sorted(f"blocks.0.{n}.weight" for n in ("attn.q_proj", "attn.kv_proj", "attn.out_proj", "mlp.up_proj", "mlp.down_proj"))
    adamw_names = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert adamw_names == set(names.values()) - set(muon_names) and "wte.weight" in adamw_names
    assert len(optimizer.param_groups) == len(muon.param_groups) + len(adamw.param_groups)


def test_a_run_with_muon_resumes_from_its_checkpoint_exactly(tmp_path):
    """The chain of Muon and AdamW saves both states in the checkpoint: 4 steps (one epoch of 4 batches), then 4
    more from last.ckpt, end on the weights of 8 steps in one go; the schedule moves Muon's rate too."""
    import torch

    whole = lm_module(max_steps=8, matrices="muon")
    lm_trainer(tmp_path / "whole", max_steps=8).fit(whole, lm_batches(8))
    first = lm_module(max_steps=8, matrices="muon")
    lm_trainer(tmp_path / "split", max_steps=4).fit(first, lm_batches(8))
    second = lm_module(max_steps=8, matrices="muon")
    trainer = lm_trainer(tmp_path / "split", max_steps=8)
    trainer.fit(second, lm_batches(8), ckpt_path=str(tmp_path / "split" / "checkpoints" / "last.ckpt"), weights_only=True)
    for (name, a), b in zip(whole.model.named_parameters(), second.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    muon_rate = trainer.optimizers[0].optimizers[0].param_groups[0]["lr"]
    assert abs(muon_rate - 1e-3 * 0.1) < 1e-9  # the cosine's floor at step 8, as AdamW's


def test_the_last_step_is_validated_when_the_interval_does_not_divide_max_steps(tmp_path):
    """7 steps, validation every 3: Lightning alone validates at steps 3 and 6; the model of step 7 must be measured
    too, or the best checkpoint (the stage's final figures and model.pt) never sees the last steps' training."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from pipeline.training import ValidateLastStep

    class Steps(Callback):
        def __init__(self):
            self.validated = []

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.validated.append(trainer.global_step)

    def fit(*extra, max_steps=7):
        steps = Steps()
        checkpoint = ModelCheckpoint(dirpath=tmp_path / f"c{len(extra)}-{max_steps}", monitor="val/loss", save_top_k=1, filename="best")
        trainer = pl.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, max_steps=max_steps,
            val_check_interval=3, check_val_every_n_epoch=None, num_sanity_val_steps=0, callbacks=[checkpoint, steps, *extra],
        )
        trainer.fit(lm_module(max_steps=max_steps), lm_batches(40), lm_batches(4))
        return steps.validated, trainer.global_step

    assert fit() == ([3, 6], 7)  # what Lightning does by itself
    assert fit(ValidateLastStep()) == ([3, 6, 7], 7)
    assert fit(ValidateLastStep(), max_steps=6) == ([3, 6], 6)  # a last step that is a validation step: validated once


def test_with_lora_muon_leaves_the_adapters_to_adamw():
    """peft=lora trains the adapters alone: their low-rank factors are no weight matrices for Muon, so optim.matrices=muon is AdamW."""
    import torch
    from omegaconf import OmegaConf

    from pipeline.model.lora import LoraSettings, apply_lora
    from pipeline.training import adamw_with_schedule, muon_matrices

    module = lm_module(max_steps=4)
    model = apply_lora(module.model, LoraSettings(r=2, alpha=4))
    assert muon_matrices(model) == []
    optimizer = adamw_with_schedule(model, OmegaConf.create({**module.hparams.optim, "matrices": "muon"}), 4)["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in model.parameters() if p.requires_grad} and trained
