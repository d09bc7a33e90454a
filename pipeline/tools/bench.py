"""Throughput of the configured model on this device, ours vs peers measured side by side in one run.

    python -m pipeline.tools.bench                                   # the tiny default on CPU
    python -m pipeline.tools.bench model=gpt2 tokenizer.vocab_size=50257 trainer.precision=bf16-mixed bench.batch_size=16
    python -m pipeline.tools.bench model=gpt2 tokenizer.vocab_size=50257 model.compile=true trainer.precision=bf16-mixed

Rows (each with tokens/s of both sides and the ratio ours / peer):
- pretraining: our Lightning stage vs a plain PyTorch loop over our GPT, and vs a plain loop over the
  `transformers` model of the same architecture and weights (GPT-2 or Llama, as `stage=export` writes);
  all train the same config on the same random token blocks with the same optimiser;
- SFT: our SFT stage's LightningModule under a Trainer vs TRL's `SFTTrainer` on the exported model,
  the same pre-tokenised prompt-completion rows (loss on completions only), batch, optimiser settings and
  precision, without gradient checkpointing (which SFTConfig turns on by default);
- reward model: our reward stage's LightningModule vs TRL's `RewardTrainer` on the exported backbone with
  transformers' sequence-classification head, the same pre-tokenised chosen / rejected rows, batch and
  optimiser settings (Bradley-Terry loss on both sides); twice: on unrelated random pairs, and on K-wise
  pairs (4 answers to a prompt, every two a pair) where our stage scores each answer once after one
  copy of the prompt, as it does by default; both rows credit each side with the same tokens per pair;
- DPO, in pairs/s: our DPO stage's LightningModule vs TRL's `DPOTrainer` on the exported model, the same
  pairs, batch, optimiser settings, beta and sigmoid loss, the reference scoring every batch on both sides
  (our `dpo.reference=online`, TRL's default); on K-wise pairs (4 answers a prompt, every two a pair) and on
  one pair per prompt, the prompt three quarters of each row;
- online RL, in episodes/s: our PPO stage's LightningModule vs TRL's `RLOOTrainer`, and our GRPO stage's vs
  TRL's `GRPOTrainer` (same group size), on the exported model, the same reward function (count of one
  token), batch of completions, KL to a frozen reference, one optimisation step per batch on both sides,
  and equal lengths: neither side stops at EOS, so every completion is `bench.gen_tokens` long; each row
  reports the mean tokens generated per episode on both sides;
- generation: our KV-cache sampler (`pipeline.model.generate`) vs `transformers` `generate` on the
  exported weights, greedy, at batch 1 and batch `bench.gen_batch`, both made to produce exactly
  `bench.gen_tokens` new tokens (no stopping at EOS).
The first steps / calls (allocation, compilation) are not timed; rates come from the median step or
call, which bursts of other jobs' load on a shared machine move less than a mean. Prints a table, MFU where the GPU's
peak is known; writes outputs/bench/bench.json. Any config override of `python -m pipeline stage=pretrain`
applies.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

import pipeline
from pipeline.errors import UserError
from pipeline.model import GPT, generate
from pipeline.model.hf import to_transformers
from pipeline.training import Batches, LanguageModelModule, adamw_with_schedule, device_peak_flops, model_config_from

CONF_DIR = str(pipeline.CONF_DIR)
BENCH_DEFAULTS = {"batch_size": None, "steps": 20, "warmup": 5, "gen_tokens": 64, "gen_prompt": 16, "gen_batch": 64, "gen_repeats": 3, "sft": 1, "reward": 1, "dpo": 1, "rl": 1, "grpo_group": 8, "rl_prompt": 64}


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        bench = {k: v for k, v in (o.split("=", 1) for o in overrides if o.startswith("bench."))}
        rest = [o for o in overrides if not o.startswith("bench.")]
        cfg = compose("config", overrides=["stage=pretrain", "paths.run_dir=outputs/bench", *rest])
    with open_dict(cfg):
        cfg.bench = {**BENCH_DEFAULTS, **{k[len("bench.") :]: int(v) for k, v in bench.items()}}
    return cfg


class StepTimes(pl.Callback):
    """Seconds of each optimisation step after the warm-up ones (a Lightning callback; the loops call begin/end).

    Rates come from the median step: on a machine shared with other jobs a burst of their load slows
    a few steps, and the median ignores those where a mean would not.
    """

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.seconds: list[float] = []
        self._start = None
        self._seen = 0

    def begin(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def end(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._seen += 1
        if self._seen > self.warmup:
            self.seconds.append(time.perf_counter() - self._start)

    def rate(self, tokens_per_step: int) -> float:
        return tokens_per_step / statistics.median(self.seconds)

    def hf_callback(self):
        """The same timer as a transformers TrainerCallback (TRL's trainers call it around each step)."""
        from transformers import TrainerCallback

        timer = self

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer.begin()

            def on_step_end(self, args, state, control, **kw):
                timer.end()

        return Timer()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.begin()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end()


def random_blocks(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq_len + 1), generator=g)
    return [{"input_ids": row} for row in ids]


def device_of(cfg) -> torch.device:
    wants_gpu = cfg.trainer.accelerator in ("gpu", "cuda") or (cfg.trainer.accelerator == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if wants_gpu else "cpu")


def autocast(cfg, device):
    precision = str(cfg.trainer.precision)
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


def plain_loop(cfg, model: torch.nn.Module, blocks, batch_size: int, steps: int, warmup: int) -> float:
    """Tokens/s of a bare training loop: forward, loss, backward, clip, AdamW step.

    model is our GPT or a transformers causal LM (whose forward returns an output with .logits).
    """
    device = device_of(cfg)
    model = model.to(device).train()
    if cfg.model.get("compile"):
        model.compile()
    optim = adamw_with_schedule(model, cfg.optim, cfg.trainer.max_steps)["optimizer"]
    data = torch.stack([b["input_ids"] for b in blocks]).to(device)
    timer = StepTimes(warmup, device)
    for step in range(warmup + steps):
        batch = data[(step * batch_size) % len(data) :][:batch_size]
        timer.begin()
        with autocast(cfg, device):
            logits = model(batch[:, :-1])
            logits = getattr(logits, "logits", logits)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
        optim.step()
        optim.zero_grad(set_to_none=True)
        timer.end()
    return timer.rate(batch_size * (data.size(1) - 1))


def fresh_models(model_config) -> tuple[GPT, torch.nn.Module]:
    """Our GPT and the transformers model with the same weights (seeded, so every side starts equal)."""
    torch.manual_seed(0)
    ours = GPT(model_config)
    return ours, to_transformers(ours)


def generation_speed(cfg, model_config, batch_size: int) -> tuple[float, float]:
    """New tokens/s of greedy generation at one batch size: (ours, transformers), same weights and prompts."""
    device = device_of(cfg)
    ours, theirs = fresh_models(model_config)
    ours, theirs = ours.to(device).eval(), theirs.to(device).eval()
    new, prompt_len = cfg.bench.gen_tokens, cfg.bench.gen_prompt
    if prompt_len + new > model_config.block_size:
        raise ValueError(f"bench.gen_prompt + bench.gen_tokens = {prompt_len + new} exceeds block_size={model_config.block_size}")
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model_config.vocab_size, (batch_size, prompt_len), generator=g).to(device)
    mask = torch.ones_like(prompts)

    def run_ours():
        out = generate(ours, prompts, mask, max_new_tokens=new, temperature=0.0, eos_id=None)
        assert out.tokens.size(1) == new

    def run_theirs():
        # min_new_tokens = max_new_tokens: transformers never stops early, like ours without eos_id.
        out = theirs.generate(input_ids=prompts, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        assert out.size(1) == prompt_len + new

    figures = []
    for fn in (run_ours, run_theirs):
        fn()  # warm-up: allocation, first-call costs
        seconds = []
        for _ in range(cfg.bench.gen_repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad(), autocast(cfg, device):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        figures.append(batch_size * new / statistics.median(seconds))  # the median call: bursts of other load skew a mean
    return figures[0], figures[1]


def bench_trainer(cfg, max_steps: int, timer: StepTimes, clip: bool = True) -> pl.Trainer:
    """A real Trainer with the configured precision and clipping, without logger, checkpoints or validation.

    clip=False for manual optimisation (PPO clips its own gradients)."""
    return pl.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=cfg.trainer.precision,
        max_steps=max_steps,
        gradient_clip_val=cfg.trainer.gradient_clip_val if clip else None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )


def lightning_stage(cfg, model_config, blocks, batch_size: int, steps: int, warmup: int) -> tuple[float, float]:
    """Tokens/s of our pretraining LightningModule under a real Trainer, and its training FLOPs per token."""
    pl.seed_everything(0, verbose=False)
    module = LanguageModelModule(model_config.to_dict(), OmegaConf.to_container(cfg.optim, resolve=True), cfg.trainer.max_steps, compile=bool(cfg.model.get("compile")))
    seq_len = blocks[0]["input_ids"].numel() - 1
    timer = StepTimes(warmup, device_of(cfg))
    bench_trainer(cfg, warmup + steps, timer).fit(module, datamodule=Batches(blocks, blocks[:batch_size], batch_size))
    return timer.rate(batch_size * seq_len), module.model.flops_per_token(seq_len)


def hf_training_args(cfg, output_dir: str, batch_size: int, max_steps: int, device: torch.device) -> dict:
    """Keyword arguments every TRL trainer config here shares: our optimiser, clipping and precision, no checkpoints, no logs."""
    precision = str(cfg.trainer.precision)
    return dict(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=batch_size, learning_rate=float(cfg.optim.lr),
        weight_decay=float(cfg.optim.weight_decay), adam_beta1=float(cfg.optim.betas[0]), adam_beta2=float(cfg.optim.betas[1]),
        max_grad_norm=float(cfg.trainer.gradient_clip_val),
        # TRL's configs turn gradient checkpointing (and bf16) on by default; ours recomputes nothing and follows trainer.precision.
        gradient_checkpointing=False, bf16=precision.startswith("bf16"), fp16=precision.startswith("16"), use_cpu=device.type == "cpu",
        save_strategy="no", report_to="none", logging_strategy="no", disable_tqdm=True, seed=0,
    )


def sft_rows(n: int, seq_len: int, vocab: int) -> list[dict]:
    """Prompt-completion rows of seq_len tokens, the first quarter prompt (no loss), as both sides take them.

    seq_len, not seq_len + 1: transformers' models take the whole row (and shift the labels inside),
    and a GPT-2 has no position beyond block_size.
    """
    from pipeline.losses.lm import IGNORE

    prompt = max(1, seq_len // 4)
    rows = []
    for r in random_blocks(n, seq_len - 1, vocab, seed=1):
        ids = r["input_ids"].tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:], "completion_mask": [0] * prompt + [1] * (len(ids) - prompt)})
    return rows


PAD_WORD, EOS_WORD = "<pad>", "<eos>"  # ids 0 and 1; not "t0" / "t1": a special token matches inside words ("t1146" -> "t1", "146")


def word_tokenizer(vocab: int):
    """A tokenizer over the ids the random rows use: word i is "t<i>", 0 and 1 are pad and EOS. TRL wants one (for padding and text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {PAD_WORD: 0, EOS_WORD: 1, **{f"t{i}": i for i in range(2, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token=PAD_WORD))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # text prompts "t5 t9 t3" (the RL and DPO trainers take text)
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # ids back to "t5 t9 t3"
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD_WORD, eos_token=EOS_WORD)


def words(ids) -> str:
    """The text word_tokenizer reads back as exactly `ids`."""
    return " ".join(PAD_WORD if i == 0 else EOS_WORD if i == 1 else f"t{i}" for i in ids)


def sft_speed(cfg, model_config, batch_size: int, steps: int, warmup: int) -> tuple[float, float]:
    """Tokens/s of SFT: (our SFTModule under Lightning, TRL SFTTrainer), same rows, weights, batch and optimiser."""
    import tempfile

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from pipeline.data.collators import PadCollator

    seq_len = cfg.data.seq_len
    rows = sft_rows(batch_size * 8, seq_len, model_config.vocab_size)
    device = device_of(cfg)
    optim = OmegaConf.to_container(cfg.optim, resolve=True)

    pl.seed_everything(0, verbose=False)
    module = LanguageModelModule(model_config.to_dict(), optim, cfg.trainer.max_steps)
    ours_timer = StepTimes(warmup, device)
    ours_rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    bench_trainer(cfg, warmup + steps, ours_timer).fit(module, datamodule=Batches(ours_rows, ours_rows[:batch_size], batch_size, collate=PadCollator(0)))

    trl_timer = StepTimes(warmup, device)

    _, hf_model = fresh_models(model_config)
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(**hf_training_args(cfg, tmp, batch_size, warmup + steps, device), max_length=seq_len, completion_only_loss=True, dataloader_drop_last=True)
        data = Dataset.from_list([{"input_ids": r["input_ids"], "completion_mask": r["completion_mask"]} for r in rows])
        sft = SFTTrainer(model=hf_model, args=args, train_dataset=data, processing_class=word_tokenizer(model_config.vocab_size), callbacks=[trl_timer.hf_callback()])
        sft.train()
    # seq_len tokens per row on both sides; seq_len - 1 of them are predicted.
    return ours_timer.rate(batch_size * (seq_len - 1)), trl_timer.rate(batch_size * (seq_len - 1))


def reward_pairs(n: int, seq_len: int, vocab: int, answers: int = 0) -> list[dict]:
    """Pre-tokenised preference pairs whose chosen and rejected sequences are seq_len tokens each.

    answers=0: unrelated random chosen and rejected rows. answers=K: K-wise comparisons, K answers to
    each prompt and a pair for every two, the prompt the first three quarters of each sequence and a
    prompt's pairs next to each other (`prompt_key`), as the embedded task's training split has them.
    """
    if not answers:
        chosen = random_blocks(n, seq_len - 1, vocab, seed=2)
        rejected = random_blocks(n, seq_len - 1, vocab, seed=3)
        return [{"chosen_ids": c["input_ids"].tolist(), "rejected_ids": r["input_ids"].tolist()} for c, r in zip(chosen, rejected)]
    prompt_len = max(1, seq_len * 3 // 4)
    per_prompt = answers * (answers - 1) // 2
    g = torch.Generator().manual_seed(4)
    pairs = []
    for key in range(-(-n // per_prompt)):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        seqs = [prompt + torch.randint(0, vocab, (seq_len - prompt_len,), generator=g).tolist() for _ in range(answers)]
        pairs += [{"chosen_ids": seqs[i], "rejected_ids": seqs[j], "prompt_key": key} for i in range(answers) for j in range(i + 1, answers)]
    return pairs[:n]


def reward_speed(cfg, model_config, batch_size: int, steps: int, warmup: int, answers: int = 0) -> tuple[float, float]:
    """Tokens/s of reward-model training: (our RewardModule under Lightning, TRL RewardTrainer), same pairs, batch and optimiser.

    Each pair is a chosen and a rejected row of seq_len tokens, and both sides are credited with
    2 x batch x seq_len tokens a step, so the ratio is one of pairs/s. TRL's model is transformers'
    sequence-classification head on the exported backbone. With answers=K the pairs are K-wise
    (see reward_pairs) and our side runs as the reward stage does: a prompt's pairs in one batch,
    each answer scored once after a single copy of the prompt (`data.share_prompts`).
    """
    import tempfile

    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from pipeline.data.collators import PairCollator
    from pipeline.stages.reward import RewardModule

    seq_len = cfg.data.seq_len
    pairs = reward_pairs(batch_size * 8, seq_len, model_config.vocab_size, answers)
    device = device_of(cfg)
    optim = OmegaConf.to_container(cfg.optim, resolve=True)

    pl.seed_everything(0, verbose=False)
    module = RewardModule(model_config.to_dict(), optim, cfg.trainer.max_steps)
    ours_timer = StepTimes(warmup, device)
    ours_rows = [{**p, "margin": 0.0, "gold_sign": 0.0} for p in pairs]
    collate = PairCollator(0, share_prompts=bool(answers), max_row=model_config.block_size)
    groups = [p["prompt_key"] for p in pairs] if answers else None
    batches = Batches(ours_rows, ours_rows[:batch_size], batch_size, collate=collate, groups=groups)
    bench_trainer(cfg, warmup + steps, ours_timer).fit(module, datamodule=batches)

    trl_timer = StepTimes(warmup, device)

    _, hf_lm = fresh_models(model_config)
    hf_lm.config.num_labels = 1
    hf_model = AutoModelForSequenceClassification.from_config(hf_lm.config)
    getattr(hf_model, hf_model.base_model_prefix).load_state_dict(getattr(hf_lm, hf_lm.base_model_prefix).state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        args = RewardConfig(**hf_training_args(cfg, tmp, batch_size, warmup + steps, device), max_length=seq_len, dataloader_drop_last=True)
        data = Dataset.from_list([{"chosen_ids": p["chosen_ids"], "rejected_ids": p["rejected_ids"]} for p in pairs])
        trainer = RewardTrainer(model=hf_model, args=args, train_dataset=data, processing_class=word_tokenizer(model_config.vocab_size), callbacks=[trl_timer.hf_callback()])
        trainer.train()
    tokens = 2 * batch_size * (seq_len - 1)
    return ours_timer.rate(tokens), trl_timer.rate(tokens)


RL_TARGET = 7  # the toy reward of the RL rows: how often a completion says token 7


def rl_prompts(cfg, model_config, n: int) -> list[list[int]]:
    """n random prompts of `bench.rl_prompt` tokens, without pad (0) or EOS (1)."""
    g = torch.Generator().manual_seed(4)
    return torch.randint(2, model_config.vocab_size, (n, int(cfg.bench.rl_prompt)), generator=g).tolist()


class CountTarget:
    """The RL rows' reward function in TRL's convention, on both sides: the count of token RL_TARGET in each completion.

    It also records how many tokens each side generated per episode: TRL passes `completion_ids`
    (up to EOS); our stages' modules count their own.
    """

    __name__ = "count_target"

    def __init__(self):
        self.lengths: list[int] = []

    def __call__(self, prompts, completions, completion_ids=None, **kw) -> list[float]:
        if completion_ids is not None:
            self.lengths += [len(ids) for ids in completion_ids]
        return [float(c.split().count(f"t{RL_TARGET}")) for c in completions]

    def mean_length(self) -> float:
        return sum(self.lengths) / max(len(self.lengths), 1)


def trl_rl_args(cfg, tmp: str, batch_size: int, steps: int, device, group: int) -> dict:
    """The keyword arguments TRL's RLOO and GRPO configs share here: sampling, lengths, KL and one step per batch."""
    new_tokens = int(cfg.bench.gen_tokens)
    return dict(
        **hf_training_args(cfg, tmp, batch_size, steps, device),
        num_generations=group, generation_batch_size=batch_size, max_completion_length=new_tokens, temperature=1.0, beta=0.05, num_iterations=1,
        generation_kwargs={"min_new_tokens": new_tokens},  # no EOS stop: every completion as long as ours
    )


def text_prompts(prompts: list[list[int]]) -> list[dict]:
    return [{"prompt": words(p)} for p in prompts]


def rl_speed(cfg, model_config, batch_size: int, steps: int, warmup: int) -> tuple[float, float, float, float]:
    """Episodes/s of online RL and tokens per episode: (our PPO stage's LightningModule, TRL RLOOTrainer, their mean lengths).

    One optimisation step each per batch of `batch_size` sampled completions of exactly
    `bench.gen_tokens` tokens to `bench.rl_prompt`-token prompts, temperature 1, KL to a frozen
    reference; the reward is the count of one token. PPO also runs its critic (forward and backward);
    RLOO has none but samples `num_generations=2` completions per prompt for its baseline.
    """
    import tempfile

    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    from pipeline.stages.ppo import Iterations, PPOModule

    device = device_of(cfg)
    vocab, new_tokens = model_config.vocab_size, int(cfg.bench.gen_tokens)
    prompts = rl_prompts(cfg, model_config, batch_size * (warmup + steps + 1))

    ppo = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "stage" / "ppo.yaml")["ppo"])
    ppo.update(iterations=warmup + steps, rollout_batch_size=batch_size, minibatch_size=batch_size, ppo_epochs=1, max_new_tokens=new_tokens, save_every=10**9, eval_every=10**9, missing_eos_penalty=0.0, kl_coef=0.05, adaptive_kl=False)
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    pl.seed_everything(0, verbose=False)
    # eos_id past the vocabulary: never sampled, so every response runs to max_new_tokens (as TRL's min_new_tokens does there)
    module = PPOModule(model_config.to_dict(), model_config.to_dict(), ppo, optim, reward_norm={}, eos_id=vocab, pad_id=0, seed=0)
    module.reference.load_state_dict(module.actor.state_dict())
    ours_lengths: list[int] = []

    def count_tokens(seqs, att, response, mask):
        ours_lengths.extend(mask.sum(1).long().tolist())
        return ((response == RL_TARGET) & mask.bool()).float().sum(1)

    module.reward_fn = count_tokens
    module.prompts = prompts
    ours_timer = StepTimes(warmup, device)
    trainer = bench_trainer(cfg, warmup + steps, ours_timer, clip=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(Iterations(warmup + steps), batch_size=1, collate_fn=lambda items: items[0]))

    trl_timer = StepTimes(warmup, device)
    reward = CountTarget()
    _, hf_model = fresh_models(model_config)
    hf_model.generation_config.eos_token_id, hf_model.generation_config.pad_token_id = 1, 0
    with tempfile.TemporaryDirectory() as tmp:
        args = RLOOConfig(**trl_rl_args(cfg, tmp, batch_size, warmup + steps, device, group=2))
        hf_model.save_pretrained(f"{tmp}/model")  # RLOO loads its reference model by name: the same weights from disk
        rloo = RLOOTrainer(model=f"{tmp}/model", reward_funcs=reward, args=args, train_dataset=Dataset.from_list(text_prompts(prompts)), processing_class=word_tokenizer(vocab), callbacks=[trl_timer.hf_callback()])
        rloo.train()
    return ours_timer.rate(batch_size), trl_timer.rate(batch_size), sum(ours_lengths) / len(ours_lengths), reward.mean_length()


def grpo_speed(cfg, model_config, batch_size: int, steps: int, warmup: int) -> tuple[float, float, float, float]:
    """Episodes/s of GRPO and tokens per episode: (our GRPO stage's LightningModule, TRL GRPOTrainer, their mean lengths).

    Each step samples `bench.grpo_group` completions to each of batch_size / group prompts
    (`bench.rl_prompt` tokens), exactly `bench.gen_tokens` long, scores them with the same reward
    function (CountTarget, TRL's reward_funcs convention on both sides), takes group-normalised
    advantages and one clipped-ratio step with the k3 KL to a frozen reference (beta 0.05) in the loss.
    Ours prefills each prompt once for its group and reads it once in every log-prob forward.
    """
    import tempfile

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from pipeline.rewards import RewardSource
    from pipeline.rl import Iterations
    from pipeline.stages.grpo import GRPOModule

    device = device_of(cfg)
    vocab, new_tokens, group = model_config.vocab_size, int(cfg.bench.gen_tokens), int(cfg.bench.grpo_group)
    if batch_size % group:
        raise UserError(f"bench.batch_size={batch_size} completions must be a multiple of bench.grpo_group={group}")
    per_step = batch_size // group
    prompts = rl_prompts(cfg, model_config, per_step * (warmup + steps + 1))
    grpo = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "stage" / "grpo.yaml")["grpo"])
    # iterations one past the timed steps: the stage's closing evaluation never falls inside a timed step
    grpo.update(iterations=warmup + steps + 1, prompts_per_rollout=per_step, group_size=group, minibatch_size=per_step, updates_per_rollout=1, max_new_tokens=new_tokens, save_every=10**9, eval_every=10**9, missing_eos_penalty=0.0, kl_coef=0.05, kl_in="loss", baseline="group_norm", anneal_lr=False)
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    pl.seed_everything(0, verbose=False)
    module = GRPOModule(model_config.to_dict(), None, grpo, optim, reward_norm={}, eos_id=vocab, pad_id=0, seed=0)  # eos_id never sampled (see rl_speed)
    module.reference.load_state_dict(module.actor.state_dict())
    ours_reward = CountTarget()
    module.sources = [RewardSource("count_target", "function", ours_reward)]
    module.prompts, module.prompt_rows = prompts, [r["prompt"] for r in text_prompts(prompts)]
    module.tokenizer = word_tokenizer(vocab)
    ours_timer = StepTimes(warmup, device)
    trainer = bench_trainer(cfg, warmup + steps, ours_timer, clip=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(Iterations(warmup + steps), batch_size=1, collate_fn=lambda items: items[0]))
    ours_length = module.totals["gen_tokens"] / module.totals["episodes"]

    trl_timer = StepTimes(warmup, device)
    trl_reward = CountTarget()
    _, hf_model = fresh_models(model_config)
    hf_model.generation_config.eos_token_id, hf_model.generation_config.pad_token_id = 1, 0
    with tempfile.TemporaryDirectory() as tmp:
        # loss_type "dapo" normalises over every token of the batch, as grpo.loss_norm=token does
        args = GRPOConfig(**trl_rl_args(cfg, tmp, batch_size, warmup + steps, device, group=group), loss_type="dapo", scale_rewards="group")
        hf_model.save_pretrained(f"{tmp}/model")
        grpo_trainer = GRPOTrainer(model=f"{tmp}/model", reward_funcs=trl_reward, args=args, train_dataset=Dataset.from_list(text_prompts(prompts)), processing_class=word_tokenizer(vocab), callbacks=[trl_timer.hf_callback()])
        grpo_trainer.train()
    return ours_timer.rate(batch_size), trl_timer.rate(batch_size), ours_length, trl_reward.mean_length()


def dpo_speed(cfg, model_config, batch_size: int, steps: int, warmup: int, answers: int) -> tuple[float, float]:
    """Pairs/s of DPO training: (our DPOModule under Lightning, TRL DPOTrainer), same pairs, batch, optimiser and loss.

    Pairs as reward_pairs makes them with `answers` per prompt (2: one pair per prompt; 4: K-wise), each
    sequence seq_len tokens ending in EOS, the prompt the first three quarters. Both sides score the
    reference in every step (our dpo.reference=online, TRL's default), sigmoid loss, beta 0.1. Ours
    runs as the stage does: a prompt's pairs in one batch, each answer read once after one copy of the
    prompt; TRL reads prompt + chosen and prompt + rejected for every pair.
    """
    import tempfile

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from pipeline.stages.dpo import DPOCollator, DPOModule

    seq_len = cfg.data.seq_len
    prompt_len = max(1, seq_len * 3 // 4)
    pairs = reward_pairs(batch_size * 8, seq_len, model_config.vocab_size, answers)
    for p in pairs:  # every answer ends in EOS (1), as TRL's DPOTrainer makes it (it appends one to an answer without)
        p["chosen_ids"][-1] = p["rejected_ids"][-1] = 1
    device = device_of(cfg)
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    dpo = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "stage" / "dpo.yaml")["dpo"])
    dpo.update(reference="online", beta=0.1, loss_type="sigmoid", label_smoothing=0.0, sft_coef=0.0)

    pl.seed_everything(0, verbose=False)
    module = DPOModule(model_config.to_dict(), optim, cfg.trainer.max_steps, dpo)
    module.reference.load_state_dict(module.model.state_dict())
    ours_timer = StepTimes(warmup, device)
    ours_rows = [{**p, "prompt_len": prompt_len, "margin": 0.0, "gold_sign": 0.0} for p in pairs]
    collate = DPOCollator(0, share_prompts=True, max_row=model_config.block_size)
    batches = Batches(ours_rows, ours_rows[:batch_size], batch_size, collate=collate, groups=[p["prompt_key"] for p in pairs])
    bench_trainer(cfg, warmup + steps, ours_timer).fit(module, datamodule=batches)

    trl_timer = StepTimes(warmup, device)
    _, hf_model = fresh_models(model_config)
    rows = [{"prompt": words(p["chosen_ids"][:prompt_len]), "chosen": " " + words(p["chosen_ids"][prompt_len:]), "rejected": " " + words(p["rejected_ids"][prompt_len:])} for p in pairs]
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(**hf_training_args(cfg, tmp, batch_size, warmup + steps, device), max_length=seq_len, beta=0.1, loss_type=["sigmoid"], dataloader_drop_last=True)
        hf_model.save_pretrained(f"{tmp}/model")  # DPOTrainer loads its reference model by name: the same weights from disk
        trainer = DPOTrainer(model=f"{tmp}/model", args=args, train_dataset=Dataset.from_list(rows), processing_class=word_tokenizer(model_config.vocab_size), callbacks=[trl_timer.hf_callback()])
        trainer.train()
    return ours_timer.rate(batch_size), trl_timer.rate(batch_size)


def row(name: str, ours: float, peer_name: str, peer: float, **extra) -> dict:
    """One row of the table; `extra` adds figures of both sides (the RL rows' tokens per episode)."""
    return {"row": name, "ours_tokens_per_s": ours, "peer": peer_name, "peer_tokens_per_s": peer, "ratio_ours_over_peer": ours / peer, **extra}


def require_trl(cfg) -> None:
    """The SFT, reward, DPO and RL rows run TRL's trainers: TRL is the `bench` extra, not a dependency of the stages."""
    import importlib.util

    if (cfg.bench.sft or cfg.bench.reward or cfg.bench.dpo or cfg.bench.rl) and importlib.util.find_spec("trl") is None:
        raise UserError("the SFT, reward, DPO and RL rows compare with TRL, which is not installed: pip install 'instructgpt-pipeline[bench]', or pass bench.sft=0 bench.reward=0 bench.dpo=0 bench.rl=0")


def main(argv: list[str]) -> dict:
    cfg = compose_config(argv)
    require_trl(cfg)
    model_config = model_config_from(cfg.model, cfg.tokenizer.vocab_size)
    seq_len = cfg.data.seq_len
    batch_size = cfg.bench.batch_size or cfg.data.batch_size
    steps, warmup = cfg.bench.steps, cfg.bench.warmup
    blocks = random_blocks(batch_size * 8, seq_len, model_config.vocab_size)
    ours_model, hf_model = fresh_models(model_config)
    arch = type(hf_model).__name__
    plain_loop(cfg, GPT(model_config), blocks, batch_size, 2, warmup)  # the process's first-touch costs, paid by neither side
    ours, flops_per_token = lightning_stage(cfg, model_config, blocks, batch_size, steps, warmup)
    plain = plain_loop(cfg, ours_model, blocks, batch_size, steps, warmup)
    hf_plain = plain_loop(cfg, hf_model, blocks, batch_size, steps, warmup)
    rows = [
        row("pretrain: Lightning stage vs plain loop, our GPT", ours, "plain PyTorch loop, our GPT", plain),
        row(f"pretrain: Lightning stage vs plain loop, transformers {arch}", ours, f"plain PyTorch loop, transformers {arch}", hf_plain),
        row(f"pretrain: plain loop, our GPT vs transformers {arch}", plain, f"plain PyTorch loop, transformers {arch}", hf_plain),
    ]
    if cfg.bench.sft:
        s_ours, s_trl = sft_speed(cfg, model_config, batch_size, steps, warmup)
        rows.append(row("sft: Lightning stage vs TRL SFTTrainer (completion-only loss)", s_ours, f"TRL SFTTrainer, transformers {arch}", s_trl))
    if cfg.bench.reward:
        r_ours, r_trl = reward_speed(cfg, model_config, batch_size, steps, warmup)
        classifier = f"TRL RewardTrainer, transformers {arch.replace('LMHead', '').replace('ForCausalLM', '')}ForSequenceClassification"
        rows.append(row("reward: Lightning stage vs TRL RewardTrainer (pairwise loss)", r_ours, classifier, r_trl))
        k_ours, k_trl = reward_speed(cfg, model_config, batch_size, steps, warmup, answers=4)
        rows.append(row("reward, K-wise pairs (4 answers a prompt, prompt 3/4 of each row): shared prompts vs TRL RewardTrainer", k_ours, classifier, k_trl))
    if cfg.bench.dpo:
        for answers, shape in ((4, "K-wise pairs (4 answers a prompt)"), (2, "one pair per prompt")):
            d_ours, d_trl = dpo_speed(cfg, model_config, batch_size, steps, warmup, answers)
            rows.append(row(f"dpo, {shape}, pairs/s: DPO stage (shared prompts) vs TRL DPOTrainer", d_ours, f"TRL DPOTrainer, transformers {arch}", d_trl))
    if cfg.bench.rl:
        shape = f"{cfg.bench.rl_prompt}-token prompts, {cfg.bench.gen_tokens} new tokens"
        e_ours, e_trl, len_ours, len_trl = rl_speed(cfg, model_config, batch_size, steps, warmup)
        lengths = lambda ours, peer: {"ours_tokens_per_episode": ours, "peer_tokens_per_episode": peer}  # noqa: E731
        rows.append(row(f"rl: PPO stage vs TRL RLOOTrainer, episodes/s ({shape})", e_ours, f"TRL RLOOTrainer, transformers {arch}", e_trl, **lengths(len_ours, len_trl)))
        e_ours, e_trl, len_ours, len_trl = grpo_speed(cfg, model_config, batch_size, steps, warmup)
        rows.append(row(f"rl: GRPO stage vs TRL GRPOTrainer, episodes/s (groups of {cfg.bench.grpo_group}, {shape})", e_ours, f"TRL GRPOTrainer, transformers {arch}", e_trl, **lengths(len_ours, len_trl)))
    for gen_batch in sorted({1, cfg.bench.gen_batch}):
        g_ours, g_hf = generation_speed(cfg, model_config, gen_batch)
        rows.append(row(f"generate: batch {gen_batch}, {cfg.bench.gen_tokens} new tokens, greedy", g_ours, f"transformers {arch}.generate", g_hf))
    device = device_of(cfg)
    peak = device_peak_flops() if device.type == "cuda" else None
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "model": {k: v for k, v in model_config.to_dict().items()},
        "transformers_architecture": arch,
        "params": GPT(model_config).num_params(),
        "precision": str(cfg.trainer.precision),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "compile": bool(cfg.model.get("compile")),
        "ours_tokens_per_s": ours,
        "plain_loop_tokens_per_s": plain,
        "transformers_loop_tokens_per_s": hf_plain,
        "ratio_ours_over_plain": ours / plain,
        "generation": {"prompt_tokens": cfg.bench.gen_prompt, "new_tokens": cfg.bench.gen_tokens, "repeats": cfg.bench.gen_repeats},
        "rows": rows,
    }
    if peak:
        result["ours_mfu"] = ours * flops_per_token / peak
        result["plain_loop_mfu"] = plain * flops_per_token / peak
        result["transformers_loop_mfu"] = hf_plain * flops_per_token / peak
    print(f"\nthroughput on {result['device']}: {result['params'] / 1e6:.1f}M parameters ({arch} when exported), {result['precision']}")
    print(f"pretraining: batch {batch_size} x {seq_len} tokens; generation: {cfg.bench.gen_prompt}-token prompts, {cfg.bench.gen_tokens} new tokens")
    if peak:
        print("MFU: " + ", ".join(f"{k[:-4]} {result[k]:.1%}" for k in ("ours_mfu", "plain_loop_mfu", "transformers_loop_mfu")))
    width = max(len(r["row"]) for r in rows)
    print(f"{'row (rates in tokens/s unless the row says)':{width}}  {'ours':>12}  {'peer':>12}  {'ours/peer':>9}  peer")
    for r in rows:
        lengths = f" (tokens per episode: ours {r['ours_tokens_per_episode']:.1f}, peer {r['peer_tokens_per_episode']:.1f})" if "ours_tokens_per_episode" in r else ""
        rate = lambda x: f"{x:>12,.0f}" if x >= 100 else f"{x:>12.2f}"  # noqa: E731  (pairs/s and episodes/s are small numbers)
        print(f"{r['row']:{width}}  {rate(r['ours_tokens_per_s'])}  {rate(r['peer_tokens_per_s'])}  {r['ratio_ours_over_peer']:>9.3f}  {r['peer']}{lengths}")
    out = Path(cfg.paths.root) / "bench" / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return result


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
