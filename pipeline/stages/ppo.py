"""Stage 4, PPO: reinforcement learning from the reward model (RLHF).

    python -m pipeline stage=ppo                                        # newest SFT and reward runs
    python -m pipeline stage=ppo ppo.kl_coef=0 ppo.adaptive_kl=false    # no KL leash: watch reward hacking

Four models on the shared backbone: the actor (policy, from SFT), the critic (value head, from the
reward model), and the frozen reference (SFT) and reward model. Every iteration samples responses
to a batch of prompts with the KV-cache sampler, scores them, turns scores and per-token KL into
rewards, estimates advantages with GAE, and runs a few epochs of clipped PPO updates over
minibatches. The details that decide whether RLHF works are those of "The N Implementation Details
of RLHF with PPO": dropout off, EOS truncation and a missing-EOS penalty, log-probs under the
sampling temperature, KL in the reward, score on the last token only, a normalised RM, value model
from the RM, whitened advantages, clipped value loss. Metric names follow TRL.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import runs
from pipeline.data.chat import prompt_ids
from pipeline.data.corpus import load_corpus
from pipeline.data.packing import tokenize_and_pack
from pipeline.errors import UserError
from pipeline.losses.lm import next_token_loss
from pipeline.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    assemble_rewards,
    entropy_from_logits,
    gae,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from pipeline.model import GPT, GPTConfig, ScalarGPT, decay_param_groups, generate, left_pad, token_logprobs, truncate_after_eos
from pipeline.rl import Iterations  # noqa: F401  (re-exported: the PPO tests and the bench drive PPOModule with it)
from pipeline.rl import OnlineRLModule, check_prompt_count, frozen_reference, fit_online, load_prompts, load_reward_model, planned_world_size, reward_normaliser, rm_scores, uses_gold
from pipeline.stages import STAGES
from pipeline.tasks import default_task
from pipeline.training import TrainedOnly, finish, lora_settings, memory_levers

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The LightningModule


@dataclass
class Rollout:
    sequences: torch.Tensor  # (B, P+N) left-padded prompt + response
    attention: torch.Tensor  # (B, P+N)
    prompt_len: int  # P
    response_mask: torch.Tensor  # (B, N)
    logprobs: torch.Tensor  # (B, N) under the policy that sampled, temperature applied
    ref_logprobs: torch.Tensor  # (B, N)
    values: torch.Tensor  # (B, N)
    scores: torch.Tensor  # (B,) normalised RM score, penalties applied
    finished: torch.Tensor  # (B,) ended with EOS


class PPOModule(OnlineRLModule):
    """Actor, critic, frozen reference and reward model; manual optimisation of actor and critic."""

    stage = "ppo"
    batch_key = "rollout_batch_size"

    def __init__(self, actor_config: dict, reward_config: dict, ppo: dict, optim: dict, reward_norm: dict, eos_id: int, pad_id: int, seed: int, shared_reference: bool = False, compile: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        no_dropout = {"dropout": 0.0}  # dropout would make log-probs of the same tokens differ between passes
        self.actor = GPT(GPTConfig.from_dict({**actor_config, **no_dropout}))
        self.reference = frozen_reference(self.actor, shared_reference)
        if shared_reference:  # LoRA: the critic and the reward model are adapters and heads, made by lora_models
            self.critic = self.reward_model = None
        else:
            self.critic = ScalarGPT(GPTConfig.from_dict({**reward_config, **no_dropout}))
            self.reward_model = ScalarGPT(GPTConfig.from_dict({**reward_config, **no_dropout}))
            for frozen in (self.reference, self.reward_model):
                frozen.requires_grad_(False).eval()
        self.cfg = OmegaConf.create(ppo)
        kl = self.cfg
        self.kl_ctl = AdaptiveKLController(kl.kl_coef, kl.target_kl, kl.horizon) if kl.adaptive_kl else FixedKLController(kl.kl_coef)
        self.reward_fn = None  # optional override of the RM (toy rewards in tests): (sequences, attention, response tokens, mask) -> (B,)
        self.ema = None
        self.ptx_blocks: torch.Tensor | None = None  # (N, L + 1) token blocks of pretraining text for PPO-ptx

    def configure_model(self) -> None:
        # model.compile: the update's forwards (with gradients) go through compiled wrappers sharing the models' parameters,
        # as in GRPO; sampling and the no-grad forwards stay eager. A LoRA critic (an adapter switched on for each call)
        # stays eager too: its adapter switch would be a guard that recompiles. Kept off the module tree.
        if self.hparams.compile and getattr(self, "_compiled", None) is None:
            critic = self.critic if isinstance(self.critic, ScalarGPT) else None
            object.__setattr__(self, "_compiled", (torch.compile(self.actor), torch.compile(critic) if critic is not None else self.critic))

    @property
    def training_models(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(actor, critic) as the update's forwards call them: compiled wrappers under model.compile, else the models."""
        compiled = getattr(self, "_compiled", None)
        return (self.actor, self.critic) if compiled is None else compiled

    def ptx_loss(self, iteration: int, minibatch: int) -> torch.Tensor:
        """Next-token loss of the actor on a batch of pretraining blocks (InstructGPT's PPO-ptx).

        The blocks are chosen by (seed, iteration, minibatch) alone, so a resumed run draws the same ones.
        """
        g = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + iteration * 1009 + minibatch)
        idx = torch.randint(len(self.ptx_blocks), (self.cfg.ptx_batch_size,), generator=g)
        blocks = self.ptx_blocks[idx].to(self.device).long()
        logits = self.actor(blocks[:, :-1])
        return next_token_loss(logits, blocks[:, 1:])

    def on_fit_start(self) -> None:
        if self.cfg.ema_decay and self.ema is None:
            self.ema = {k: v.detach().clone() for k, v in self.actor.state_dict().items()}

    # -- rollout ---------------------------------------------------------------------------

    def score(self, sequences, attention, response, response_mask) -> torch.Tensor:
        if self.reward_fn is not None:
            return self.reward_fn(sequences, attention, response, response_mask).float()
        return rm_scores(self.reward_model, sequences, attention, self.hparams.reward_norm, self.cfg.scale_reward_by_std)

    def forward_policy(self, model: GPT, sequences, attention, prompt_len: int, response) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs (under the sampling temperature) of the response tokens, and the logits that gave them."""
        # The output head runs only on the positions that predict the response.
        logits = model(sequences, attention_mask=attention, keep=(slice(None), slice(prompt_len - 1, -1)))  # (B, N, V)
        return token_logprobs(logits, response, self.cfg.temperature), logits

    @torch.no_grad()
    def rollout(self, prompts: list[list[int]], generator: torch.Generator | None = None) -> Rollout:
        tok_pad, eos = self.hparams.pad_id, self.hparams.eos_id
        ids, mask = left_pad(prompts, tok_pad, self.device)
        self.actor.eval()
        gen = generate(
            self.actor,
            ids,
            mask,
            max_new_tokens=self.cfg.max_new_tokens,
            temperature=self.cfg.temperature,  # no top-k / top-p: the stored log-probs are of this distribution (checks.py refuses them)
            eos_id=eos,
            pad_id=tok_pad,
            generator=generator if generator is not None else self.sample_generator(self.iteration),
        )
        response, response_mask = truncate_after_eos(gen.tokens, gen.mask, eos, tok_pad)
        sequences = torch.cat([ids, response], dim=1)
        attention = torch.cat([mask, response_mask], dim=1)
        P = ids.size(1)
        logprobs, _ = self.forward_policy(self.actor, sequences, attention, P, response)
        ref_logprobs, _ = self.forward_policy(self.reference, sequences, attention, P, response)
        values = self.critic(sequences, attention_mask=attention)[:, P - 1 : -1].float()
        scores = self.score(sequences, attention, response, response_mask)
        finished = gen.finished
        if self.cfg.missing_eos_penalty:
            scores = torch.where(finished, scores, scores - self.cfg.missing_eos_penalty)
        self.actor.train()
        m = response_mask.float()
        return Rollout(sequences, attention, P, m, logprobs * m, ref_logprobs * m, values * m, scores, finished)

    # -- one PPO iteration ---------------------------------------------------------------------

    def training_step(self, batch, batch_idx):
        """One PPO iteration at its four seams: experience, advantages, update, logging."""
        if self.iteration >= self.cfg.iterations:  # a resumed run whose loop replays batches it already did
            self.trainer.should_stop = True
            return
        started = time.perf_counter()
        roll = self.rollout(self.prompt_batch(self.iteration))
        rollout_s = time.perf_counter() - started
        kl, advantages, returns = self.advantages(roll)
        update_started = time.perf_counter()
        stats = self.update(roll, advantages, returns)
        update_s = time.perf_counter() - update_started
        self.log_iteration(roll, kl, stats, rollout_s, update_s)
        self.iteration += 1
        if self.iteration % self.cfg.eval_every == 0 or self.iteration == self.cfg.iterations:
            self.evaluate()
        if self.iteration % self.cfg.save_every == 0:
            self.save_last()

    def advantages(self, roll: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token KL, and GAE advantages (whitened) and returns of the per-token rewards (score at the last token, KL penalty at every token)."""
        cfg, mask = self.cfg, roll.response_mask
        rewards, kl = assemble_rewards(roll.scores, roll.logprobs, roll.ref_logprobs, mask, self.kl_ctl.value, cfg.kl_estimator)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=self.world_sum)
        advantages, returns = gae(roll.values, rewards, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask, all_reduce=self.world_sum)  # over every rank's batch, as on one process
        self.check_finite("advantages or returns", advantages, returns)
        return kl, advantages, returns

    def update(self, roll: Rollout, advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, torch.Tensor]:
        """ppo_epochs passes of clipped policy and value updates over shuffled minibatches; the mean of each statistic."""
        cfg, mask = self.cfg, roll.response_mask
        opt_actor, opt_critic = self.optimizers()
        B = mask.size(0)
        mb = min(cfg.minibatch_size, B)
        use_ptx = bool(cfg.ptx_coef) and self.ptx_blocks is not None
        stats = {k: [] for k in ("pg", "vf", "clipfrac", "approxkl", "entropy", "vf_clipfrac", "ratio", *(("ptx",) if use_ptx else ()))}
        minibatch = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=torch.Generator().manual_seed(self.hparams.seed + self.iteration))
            for start in range(0, B, mb):
                idx = order[start : start + mb].to(self.device)
                seqs, att, m = roll.sequences[idx], roll.attention[idx], mask[idx]
                response = seqs[:, roll.prompt_len :]
                actor, critic = self.training_models
                new_logprobs, logits = self.forward_policy(actor, seqs, att, roll.prompt_len, response)
                new_values = critic(seqs, attention_mask=att)[:, roll.prompt_len - 1 : -1].float()
                pg, clipfrac, approxkl = policy_loss(new_logprobs, roll.logprobs[idx], advantages[idx], m, cfg.clip_ratio)
                vf, vf_clipfrac = value_loss(new_values, roll.values[idx], returns[idx], m, cfg.value_clip)
                # The entropy of the distribution that samples (under the temperature); outside the graph when it carries no loss.
                with torch.set_grad_enabled(bool(cfg.entropy_coef)):
                    entropy = masked_mean(entropy_from_logits(logits / cfg.temperature), m)
                loss = pg + cfg.vf_coef * vf - cfg.entropy_coef * entropy
                if use_ptx:
                    ptx = self.ptx_loss(self.iteration, minibatch)
                    loss = loss + cfg.ptx_coef * ptx
                    stats["ptx"].append(ptx.detach())
                minibatch += 1
                self.check_finite("loss", loss)
                opt_actor.zero_grad()
                opt_critic.zero_grad()
                self.manual_backward(loss)  # one backward through actor and critic keeps DDP's gradient sync in one pass
                self.clip_gradients(opt_actor, gradient_clip_val=cfg.max_grad_norm, gradient_clip_algorithm="norm")
                self.clip_gradients(opt_critic, gradient_clip_val=cfg.max_grad_norm, gradient_clip_algorithm="norm")
                if self.iteration >= cfg.get("critic_warmup", 0):  # the first iterations fit the critic alone
                    opt_actor.step()
                opt_critic.step()
                ratio = masked_mean(torch.exp(new_logprobs.detach() - roll.logprobs[idx]), m)
                for k, v in (("pg", pg), ("vf", vf), ("clipfrac", clipfrac), ("approxkl", approxkl), ("entropy", entropy), ("vf_clipfrac", vf_clipfrac), ("ratio", ratio)):
                    stats[k].append(v.detach())
        schedulers = self.lr_schedulers()
        for sched in schedulers if isinstance(schedulers, list) else [schedulers]:
            sched.step()
        if self.ema is not None:
            with torch.no_grad():
                for k, v in self.actor.state_dict().items():
                    if v.is_floating_point():
                        self.ema[k].lerp_(v, 1.0 - cfg.ema_decay)
        return {k: torch.stack(v).mean() for k, v in stats.items()}

    def log_iteration(self, roll: Rollout, kl: torch.Tensor, mean: dict[str, torch.Tensor], rollout_s: float, update_s: float) -> None:
        """Move the KL controller, warn on large steps, and log the iteration under TRL's metric names."""
        cfg, mask = self.cfg, roll.response_mask
        B = mask.size(0)
        seq_kl = self.world_mean(kl.sum(1).mean())  # every rank moves kl_coef by the same, global, KL
        self.kl_ctl.update(float(seq_kl), B * self.trainer.world_size)
        if float(mean["ratio"]) > cfg.warn_ratio or float(mean["approxkl"]) > cfg.warn_approxkl:
            log.warning("iteration %d: policy ratio %.3f / approx KL %.4f are large: lower optim.lr or raise ppo.kl_coef", self.iteration, float(mean["ratio"]), float(mean["approxkl"]))
        gen_tokens = float(mask.sum()) * self.trainer.world_size
        figures = {
            "objective/kl": seq_kl,
            "objective/scores": roll.scores.mean(),
            "objective/rlhf_reward": roll.scores.mean() - self.kl_ctl.value * seq_kl,
            "objective/non_score_reward": -self.kl_ctl.value * seq_kl,
            "objective/entropy": (-roll.logprobs).sum(1).mean(),
            "objective/kl_coef": self.kl_ctl.value,
            "policy/approxkl_avg": mean["approxkl"],
            "policy/clipfrac_avg": mean["clipfrac"],
            "policy/entropy_avg": mean["entropy"],
            "loss/policy_avg": mean["pg"],
            "loss/value_avg": mean["vf"],
            **({"loss/ptx_avg": mean["ptx"]} if "ptx" in mean else {}),
            "val/clipfrac_avg": mean["vf_clipfrac"],
            "val/ratio": mean["ratio"],
            "val/num_eos_tokens": roll.finished.float().sum(),
            "val/response_length": mask.sum(1).mean(),
            "time/rollout_s": rollout_s,
            "time/update_s": update_s,
            "perf/gen_tokens_per_s": gen_tokens / max(rollout_s, 1e-9),
        }
        self.log_dict({k: float(v) for k, v in figures.items()})

    # -- evaluation --------------------------------------------------------------------------

    def eval_answers(self, prompts: list) -> tuple[list[str], dict[str, torch.Tensor]]:
        """Greedy answers and their normalised RM scores."""
        seqs, att, response, rmask, texts = self.greedy([prompt_ids(self.tokenizer, p) for p in prompts])
        return texts, {"eval/rm_score": self.score(seqs, att, response, rmask)}

    def sampled_kl(self, prompts: list) -> torch.Tensor:
        """KL(policy || reference) in nats per response, one sampled response per prompt: (B,).

        The summed log-ratio of tokens the policy samples (at ppo.temperature, both models under it) is
        an unbiased estimate of the sequence KL between the two sampling distributions. A greedy
        answer's log-ratio is not a KL estimate (it is not a sample), so the x-axis of the evaluation
        curve is this one. The generator depends on the seed alone: every evaluation draws alike.
        """
        return self.kl_to_reference([prompt_ids(self.tokenizer, p) for p in prompts])

    # -- optimisers and checkpoint state ----------------------------------------------------

    def configure_optimizers(self):
        o = self.hparams.optim
        fused = torch.cuda.is_available() and next(self.actor.parameters()).is_cuda
        actor_params, critic_params = self.actor, self.critic
        if self.hparams.shared_reference:  # LoRA: the actor's own adapter; the critic's adapter and head (on the actor's base or the RM's)
            from pipeline.model.lora import adapter_parameters

            actor_params, critic_params = adapter_parameters(self.actor), self.critic.parameters_to_train()
        actor = torch.optim.AdamW(decay_param_groups(actor_params, o["weight_decay"]), lr=o["lr"], betas=tuple(o["betas"]), eps=1e-5, fused=fused or None)
        critic = torch.optim.AdamW(decay_param_groups(critic_params, o["weight_decay"]), lr=self.cfg.critic_lr, betas=tuple(o["betas"]), eps=1e-5, fused=fused or None)
        total = self.cfg.iterations
        decay = lambda it: max(0.0, 1.0 - it / max(1, total)) if self.cfg.anneal_lr else 1.0  # noqa: E731
        return [actor, critic], [torch.optim.lr_scheduler.LambdaLR(actor, decay), torch.optim.lr_scheduler.LambdaLR(critic, decay)]

    def extra_state(self) -> dict:
        return {"kl_ctl": self.kl_ctl.state_dict(), "ema": self.ema}

    def load_extra_state(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.ema = state["ema"]

    def on_train_start(self) -> None:
        if self.ema is not None:  # a checkpoint's EMA arrives on the CPU; it averages the actor where the actor lives
            device = next(self.actor.parameters()).device
            self.ema = {k: v.to(device) for k, v in self.ema.items()}


# ---------------------------------------------------------------------------------------------
# The stage


def reset_value_head(critic: ScalarGPT) -> None:
    """Start the critic's head at zero: every value 0, the mean of the centred rewards.

    The critic keeps the reward model's backbone (features that know what a good answer is), but the
    RM's head was trained only at the last token; at every other position it gives numbers several
    units away from any return. Left in place, the first iterations' whitened advantages are that error,
    not the reward, and the actor takes large steps in random directions before the critic catches up.
    """
    with torch.no_grad():
        critic.score_head.weight.zero_()
        critic.score_head.bias.zero_()


SHARE_BASE = ("auto", "true", "false")


def shared_base_refusal(reward_payload: dict, reward_path: Path, actor_digest: str, actor_path: Path, quantize: str | None) -> str | None:
    """Why the reward run cannot be an adapter on the policy's base (None: it can)."""
    info = reward_payload.get("lora")
    if info is None:
        return f"reward_from={reward_path} is a fully trained reward model, not an adapter: train it with peft=lora on the policy's SFT run ({actor_path})"
    if info["settings"].get("quantize") != quantize:
        return f"reward_from={reward_path} is an adapter on a {info['settings'].get('quantize') or 'float'} base, the policy's is {quantize or 'float'}: train both with the same peft method"
    if info["base_sha256"] != actor_digest:
        return f"reward_from={reward_path} is an adapter on another base ({info['base']}) than the policy's (init_from={actor_path}; the digests differ)"
    return None


def lora_models(module: PPOModule, settings, reward_model: ScalarGPT, reward_payload: dict, reward_path: Path, actor_path: Path, share: str) -> bool:
    """peft=lora / qlora: the actor's adapter, and the critic and reward model on as few frozen bases as the runs allow.

    One base (`share`=auto when the reward run is a LoRA adapter on the policy's SFT base, or true):
    the SFT base carries three adapters, the actor's ("default", trained), the reward model's
    ("reward", frozen, from the reward run) and the critic's ("critic", trained, starting as the
    reward model's); the critic and the reward model each add a head of n_embd + 1 numbers, and the
    reference is the base with every adapter off. Four models, one copy of the weights.
    Otherwise two bases: the SFT base (actor, reference) and one frozen copy of the reward model,
    which carries the critic's adapter (the reward model is that copy with its adapter off).
    Returns whether the base is shared.
    """
    from pipeline.model.lora import ADAPTER, AdapterHead, AdaptersOff, LoraSettings, add_adapter, apply_lora, base_digest, load_adapter_state_dict

    actor = apply_lora(module.actor, settings)
    head_state = {k.removeprefix("score_head."): v for k, v in reward_model.state_dict().items() if k.startswith("score_head.")}

    def head() -> torch.nn.Linear:
        linear = torch.nn.Linear(reward_model.config.n_embd, 1, bias=True)
        linear.load_state_dict(head_state)
        return linear

    refusal = None if share == "false" else shared_base_refusal(reward_payload, reward_path, base_digest(actor), actor_path, settings.quantize)
    if share == "true" and refusal is not None:
        raise UserError(f"ppo.share_base=true: {refusal}")
    if share != "false" and refusal is None:
        reward_settings = LoraSettings.from_dict(reward_payload["lora"]["settings"])
        for name, trainable in (("reward", False), ("critic", True)):
            add_adapter(actor, name, reward_settings, trainable=trainable)
            load_adapter_state_dict(actor, reward_payload["adapter_state_dict"], adapter=name)
        module.critic = AdapterHead(actor, "critic", head())
        module.reward_model = AdapterHead(actor, "reward", head()).requires_grad_(False).eval()
        return True
    if share == "auto":
        log.info("ppo: the critic and the reward model on a copy of the reward model, not on the policy's base: %s", refusal)
    backbone = ScalarGPT(GPTConfig.from_dict({**reward_model.config.to_dict(), "dropout": 0.0}))
    backbone.load_state_dict(reward_model.state_dict())
    apply_lora(backbone, settings)  # the critic's adapter
    backbone.score_head.requires_grad_(False)  # the reward model's head; the critic has its own
    module.reward_backbone = backbone
    module.critic = AdapterHead(backbone, ADAPTER, head())
    module.reward_model = AdaptersOff(backbone).eval()
    return False


def load_ptx_blocks(cfg: DictConfig, tokenizer, block_size: int) -> torch.Tensor:
    """Packed blocks of pretraining text for PPO-ptx: ppo.ptx_data, or the embedded corpus, with the policy's tokenizer."""
    seq_len = int(cfg.ppo.ptx_seq_len)
    if not 1 <= seq_len <= block_size:
        raise UserError(f"ppo.ptx_seq_len={seq_len} must be between 1 and the model's context ({block_size})")
    corpus_cfg = OmegaConf.merge(cfg, {"data": {"path": cfg.ppo.ptx_data, "columns": None}})
    ds, source = load_corpus(corpus_cfg)
    blocks = tokenize_and_pack(ds["train"], tokenizer, seq_len).with_format("torch")["input_ids"]
    log.info("ppo-ptx: %d blocks of %d tokens from %s, coefficient %s", len(blocks), seq_len, source, cfg.ppo.ptx_coef)
    return blocks


def run(cfg: DictConfig, run_dir: Path) -> dict:
    started = time.time()
    if cfg.ppo.ema_decay and lora_settings(cfg) is not None:
        raise UserError(f"ppo.ema_decay={cfg.ppo.ema_decay} with peft={cfg.peft.method}: the moving average is kept of full weights, not of adapters; pass ppo.ema_decay=0")
    pl.seed_everything(cfg.seed, workers=True)
    root = Path(cfg.paths.root)
    actor, tokenizer, actor_payload, actor_path = runs.load_start(cfg.init_from, STAGES["ppo"].starts_from, root, "ppo", run_name=run_dir.name)
    if actor_payload.get("kind") == "scalar":
        raise UserError(f"init_from={actor_path} is a reward model (a scalar head), not a policy: PPO's policy starts from an SFT run")
    reward_model, reward_payload, reward_path = load_reward_model(cfg, "ppo", STAGES["ppo"].inputs["reward_from"], tokenizer, actor, actor_path, run_dir.name)
    parents = runs.parent_record(init_from=actor_path, reward_from=reward_path)
    runs.check_parents(run_dir, parents)
    max_prompt = actor.config.block_size - cfg.ppo.max_new_tokens
    if max_prompt < 1:
        raise UserError(f"ppo.max_new_tokens={cfg.ppo.max_new_tokens} leaves no room for a prompt in the policy's context of {actor.config.block_size} tokens (init_from={actor_path})")
    prompts, _, eval_prompts, source = load_prompts(cfg, tokenizer, max_prompt, "ppo")
    check_prompt_count(len(prompts), int(cfg.ppo.rollout_batch_size), planned_world_size(cfg), source, "ppo.rollout_batch_size")

    module = PPOModule(
        actor_config=actor.config.to_dict(),
        reward_config=reward_model.config.to_dict(),
        ppo=OmegaConf.to_container(cfg.ppo, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        reward_norm=reward_normaliser(reward_payload),
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        seed=cfg.seed,
        shared_reference=lora_settings(cfg) is not None,
        compile=bool(cfg.model.get("compile", False)),
    )
    module.actor.load_state_dict(actor.state_dict())
    settings, shared_base, peft_callbacks = lora_settings(cfg), False, []
    if settings is None:
        module.reference.load_state_dict(actor.state_dict())
        module.critic.load_state_dict(reward_model.state_dict())
        module.reward_model.load_state_dict(reward_model.state_dict())
    else:
        share = str(cfg.ppo.get("share_base", "auto")).lower()  # true / false arrive as booleans
        if share not in SHARE_BASE:
            raise UserError(f"ppo.share_base={cfg.ppo.share_base}: must be auto, true or false")
        shared_base = lora_models(module, settings, reward_model, reward_payload, reward_path, actor_path, share)
    if cfg.ppo.get("critic_head", "zero") == "zero":
        reset_value_head(module.critic)
    memory_levers(cfg, module.actor, getattr(module.critic, "backbone", module.critic))  # the trained models: a LoRA critic's backbone is the actor or the RM copy
    if settings is not None:
        module.strict_loading = False  # the checkpoints hold what trains (TrainedOnly): adapters and the critic's head
        peft_callbacks = [TrainedOnly(module, "")]
        log.info("ppo: %s (rank %d), %s, %d parameters train", cfg.peft.method, settings.r, "one shared base" if shared_base else "two bases (the policy's, the reward model's)", sum(p.numel() for p in module.parameters() if p.requires_grad))
    block_size = actor.config.block_size
    del actor, reward_model, actor_payload, reward_payload  # the module holds what it needs; the loaded copies would stay in memory through the fit
    module.prompts, module.eval_prompts, module.tokenizer = prompts, eval_prompts, tokenizer
    if cfg.ppo.ptx_coef:
        module.ptx_blocks = load_ptx_blocks(cfg, tokenizer, block_size)
    if uses_gold(cfg):
        module.gold_fn = default_task().gold_score
    iterations = int(cfg.ppo.iterations)
    log.info("ppo: %d prompts from %s; actor %s; reward model %s; %d iterations", len(prompts), source, actor_path, reward_path, iterations)

    trainer, start_point, final_point = fit_online(cfg, run_dir, module, iterations, [actor_path, reward_path], len(prompts), source, peft_callbacks)
    if not trainer.is_global_zero:
        return {}
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics = {
        "stage": "ppo",
        "data": source,
        "init_from": str(actor_path),
        "reward_from": str(reward_path),
        "parents": parents,
        "train/iterations": module.iteration,
        "peft": cfg.peft.method if settings is not None else "none",
        "ppo/shared_base": shared_base,
        "train/trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "start/rm_score": start_point.get("eval/rm_score"),
        "final/rm_score": final_point.get("eval/rm_score"),
        "final/kl": final_point.get("eval/kl"),
        "objective/kl": logged.get("objective/kl"),
        "objective/kl_coef": module.kl_ctl.value,
        "time/rollout_s_per_iteration": logged.get("time/rollout_s"),
        "time/update_s_per_iteration": logged.get("time/update_s"),
        "perf/gen_tokens_per_s": logged.get("perf/gen_tokens_per_s"),
        "history": module.history,
        "time/total_s": time.time() - started,
    }
    if "eval/gold_score" in start_point:
        metrics["gold/start"] = start_point["eval/gold_score"]
        metrics["gold/final"] = final_point["eval/gold_score"]
    policy = module.actor
    if module.ema is not None:
        policy = GPT(module.actor.config)
        policy.load_state_dict(module.ema)
    finish(run_dir, policy, tokenizer, metrics, trainer, kind="lm", stage="ppo", base=actor_path)
    return metrics
