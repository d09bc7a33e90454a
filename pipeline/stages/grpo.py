"""GRPO, the RL stage beside PPO: online RL without a critic, each prompt's group of samples its own baseline (GRPO, Dr. GRPO, RLOO).

    python -m pipeline stage=grpo                                          # newest SFT and reward runs: grpo.reward=rm
    python -m pipeline stage=grpo grpo.reward=gold                         # the embedded task's judge as the reward (RLVR)
    python -m pipeline stage=grpo grpo.reward=my_rewards:brevity           # a reward function, TRL's reward_funcs convention
    python -m pipeline stage=grpo 'grpo.reward=[rm,checks.py:fmt]' grpo.reward_weights=[1,0.5]
    python -m pipeline stage=grpo grpo.baseline=mean grpo.loss_norm=token  # Dr. GRPO: no std division, every token weighs the same
    python -m pipeline stage=grpo grpo.baseline=rloo grpo.kl_in=reward     # RLOO: leave-one-out baseline, KL in the reward

Two models on the shared backbone, the actor (from SFT) and its frozen reference, plus the reward
model when a reward source is `rm`. Every iteration samples `group_size` responses to each of this
rank's `prompts_per_rollout` prompts (one prefill per prompt: `generate(num_samples=G)`), scores them
(the reward model, the gold judge, the user's functions, weighted), and turns each score into an
advantage against the other samples of its prompt (pipeline/losses/grpo.py): (r - mean) / std for
GRPO, r - mean for Dr. GRPO, r - mean of the others for RLOO. The policy takes PPO's clipped-ratio
step with that advantage on every token, `updates_per_rollout` passes over minibatches of whole
groups, with the KL to the reference either as k3 in the loss (GRPO) or in the reward (PPO, RLOO).

What decides whether it works: groups whose samples all score the same carry no signal (logged as
`frac_reward_zero_std`); std division weights easy prompts up and per-sequence length
normalisation favours long wrong answers (Dr. GRPO removes both: `baseline=mean loss_norm=token`);
EOS truncation and a missing-EOS penalty, log-probs under the sampling temperature, dropout off (as
PPO). Every forward of the policy and the reference reads each prompt once: a group's sequences are
packed in one row after a single copy of the prompt (`data.collators.pack_sequences`). Metric names
follow TRL's GRPOTrainer.
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
from pipeline.data.chat import prompt_ids, prompt_text
from pipeline.data.collators import pack_sequences
from pipeline.errors import UserError
from pipeline.losses.grpo import group_advantages, grpo_loss, kl_in_reward, zero_signal_groups
from pipeline.losses.ppo import entropy_from_logits, masked_mean
from pipeline.model import GPT, GPTConfig, ScalarGPT, decay_param_groups, generate, left_pad, token_logprobs, truncate_after_eos
from pipeline.rewards import RewardSource, completions_for, parse_reward_sources, weighted_rewards
from pipeline.rl import OnlineRLModule, check_prompt_count, frozen_reference, fit_online, load_prompts, load_reward_model, normalise_scores, planned_world_size, reward_normaliser, rm_scores, uses_gold
from pipeline.stages import STAGES
from pipeline.tasks import default_task
from pipeline.training import apply_peft, finish, lora_settings, memory_levers

log = logging.getLogger(__name__)

# The widest packed row: one default group (a prompt + 8 responses of 40 tokens) fits, and the
# (row, row) attention mask of a packed row stays small.
MAX_ROW = 1024


def forward_batch(model: GPT, batch: dict) -> torch.Tensor:
    """A model's outputs over a pack_sequences batch: its packed rows, or right-padded ones where nothing was shared."""
    if "packed_mask" in batch:
        return model(batch["input_ids"], packed=(batch["positions"], batch["packed_mask"]))
    return model(batch["input_ids"])  # right padding: causal attention needs no mask


def dense_tokens(values: torch.Tensor, target_seq: torch.Tensor, n_seqs: int, width: int) -> torch.Tensor:
    """Per-token values of a pack_sequences batch (n_targets,), each sequence's contiguous and in order, as (n_seqs, width).

    Token t of sequence i's scored part lands at [i, t]; the rest is 0. Differentiable.
    """
    counts = torch.bincount(target_seq, minlength=n_seqs)
    starts = counts.cumsum(0) - counts
    offset = torch.arange(target_seq.numel(), device=target_seq.device) - starts[target_seq]
    return values.new_zeros(n_seqs, width).index_put((target_seq, offset), values)


@dataclass
class GroupRollout:
    sequences: list[list[int]]  # B*G prompt + response ids, unpadded, prompt-major (row b*G+g: sample g of prompt b)
    prompt_lens: list[int]  # (B*G,) where each response starts
    response: torch.Tensor  # (B*G, N) response ids, pad after EOS
    mask: torch.Tensor  # (B*G, N) float, 1 on response tokens
    finished: torch.Tensor  # (B*G,) ended with EOS
    rewards: torch.Tensor  # (B*G,) the weighted sources' reward, missing-EOS penalty applied (what is logged)
    per_source: dict[str, torch.Tensor]  # name -> (B*G,) each source's own reward
    advantages: torch.Tensor  # (B*G,) against the other samples of the prompt
    sampled_logprobs: torch.Tensor  # (B*G, N) of the policy that sampled, as the sampler recorded them
    old_logprobs: torch.Tensor | None  # (B*G, N) a forward before any update; None where the update's own forward serves
    ref_logprobs: torch.Tensor | None  # (B*G, N); None at kl_coef 0


class GRPOModule(OnlineRLModule):
    """Actor, frozen reference and (with an rm source) the reward model; manual optimisation of the actor."""

    stage = "grpo"
    batch_key = "prompts_per_rollout"

    def __init__(self, actor_config: dict, reward_config: dict | None, grpo: dict, optim: dict, reward_norm: dict, eos_id: int, pad_id: int, seed: int, shared_reference: bool = False, compile: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        no_dropout = {"dropout": 0.0}  # dropout would make log-probs of the same tokens differ between passes
        self.actor = GPT(GPTConfig.from_dict({**actor_config, **no_dropout}))
        self.reference = frozen_reference(self.actor, shared_reference)  # at kl_coef 0 only the evaluation's KL reads it
        self.reward_model = ScalarGPT(GPTConfig.from_dict({**reward_config, **no_dropout})) if reward_config is not None else None
        for frozen in (self.reference, self.reward_model):
            if frozen is not None:
                frozen.requires_grad_(False).eval()
        self.cfg = OmegaConf.create(grpo)
        self.sources: list[RewardSource] = []  # what grpo.reward names (set by the stage)
        self.prompt_rows: list = []  # the training prompts as TRL prompts, aligned with self.prompts: what reward functions read
        # Run totals for metrics.json, in the checkpoint so that a resumed run counts the whole run.
        self.totals = {"episodes": 0, "gen_tokens": 0, "rollout_s": 0.0, "update_s": 0.0, "iterations": 0}

    @property
    def group_size(self) -> int:
        return int(self.cfg.group_size)

    def configure_model(self) -> None:
        # model.compile: the update's forward (with gradients) goes through a compiled wrapper that shares the actor's
        # parameters. Not the actor in place: sampling (KV cache) and the no-grad forwards stay eager, graphs of their own
        # that would be compiled for little. Kept off the module tree (no second set of state_dict keys).
        if self.hparams.compile and getattr(self, "_compiled_actor", None) is None:
            object.__setattr__(self, "_compiled_actor", torch.compile(self.actor))

    @property
    def training_actor(self) -> torch.nn.Module:
        """What the update's forward calls: the compiled wrapper of the actor under model.compile, else the actor."""
        compiled = getattr(self, "_compiled_actor", None)
        return self.actor if compiled is None else compiled

    # -- forwards over packed groups -----------------------------------------------------------

    def packed(self, sequences: list[list[int]], prompt_lens: list[int], rows: list[int]) -> dict:
        """One pack_sequences batch of the sequences `rows`: each group's prompt read once."""
        G = self.group_size
        batch = pack_sequences([sequences[r] for r in rows], [r // G for r in rows], self.hparams.pad_id, share_prompts=True, max_row=MAX_ROW, score_from=[prompt_lens[r] for r in rows])
        return {k: v.to(self.device) for k, v in batch.items()}

    def minibatches(self, n_seqs: int) -> list[list[int]]:
        """The rows 0..n_seqs-1 in order, minibatch_size whole groups at a time: what the frozen forwards read together."""
        G = self.group_size
        step = min(int(self.cfg.minibatch_size), n_seqs // G) * G
        return [list(range(start, min(start + step, n_seqs))) for start in range(0, n_seqs, step)]

    def response_logprobs(self, model: GPT, batch: dict, n_seqs: int, width: int, entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (n_seqs, width) of each response's tokens under the sampling temperature, and their entropies where asked."""
        # index_select: repeated indices (a group's shared prompt) give a deterministic backward (see engine.sequence_logprobs)
        picked = forward_batch(model, batch).flatten(0, 1).index_select(0, batch["target_index"])  # (n_targets, V): the logits that predict each response token
        per_token = token_logprobs(picked[None], batch["target_ids"][None], self.cfg.temperature)[0]
        logprobs = dense_tokens(per_token, batch["target_seq"], n_seqs, width)
        if not entropy:
            return logprobs, None
        with torch.no_grad():  # logged only: the entropy of the distribution that samples
            ent = entropy_from_logits(picked.detach().float() / self.cfg.temperature)
        return logprobs, dense_tokens(ent, batch["target_seq"], n_seqs, width)

    @torch.no_grad()
    def frozen_logprobs(self, model: GPT, sequences: list[list[int]], prompt_lens: list[int], width: int) -> torch.Tensor:
        """(B*G, width) log-probs of every response under `model`, minibatch by minibatch of whole groups."""
        return torch.cat([self.response_logprobs(model, self.packed(sequences, prompt_lens, rows), len(rows), width)[0] for rows in self.minibatches(len(sequences))])

    @torch.no_grad()
    def rm_scores_packed(self, sequences: list[list[int]], prompt_lens: list[int]) -> torch.Tensor:
        """The reward model's normalised scores (B*G,) at each sequence's last token, over packed groups."""
        raw = []
        for rows in self.minibatches(len(sequences)):
            batch = self.packed(sequences, prompt_lens, rows)
            raw.append(forward_batch(self.reward_model, batch).flatten()[batch["score_index"]].float())
        return normalise_scores(torch.cat(raw), self.hparams.reward_norm, self.cfg.scale_reward_by_std)

    # -- rewards -------------------------------------------------------------------------------

    def uses_rm(self) -> bool:
        return any(s.kind == "rm" for s in self.sources)

    def decode(self, response: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode(r[m.bool()], skip_special_tokens=True).strip() for r, m in zip(response, mask)]

    def source_rewards(self, prompts: list, texts: list[str], rm: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted reward of completions to TRL prompts, and each source's own; a failing reward function stops every rank.

        A rank whose reward function raised (or returned the wrong count, or NaN) holds the UserError
        that names it; the others learn of it through one all-reduce and stop too, so none waits in
        the next collective.
        """
        failure = None
        total = per_source = None
        try:
            total, per_source = weighted_rewards(self.sources, prompts, completions_for(prompts, texts), rm)
        except UserError as error:
            failure = error
        in_fit = self._trainer is not None and self.trainer.training  # all ranks run this together only inside the fit
        failed = torch.tensor(float(failure is not None), device=self.device)
        if (float(self.world_sum(failed)) if in_fit else float(failed)) > 0:
            raise failure or UserError(f"GRPO stopped at iteration {self.iteration}: a reward function failed on another process (its message is in that process's log)")
        return total.to(self.device), {k: v.to(self.device) for k, v in per_source.items()}

    # -- rollout -------------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, indices: list[int], generator: torch.Generator | None = None) -> GroupRollout:
        """G samples of each prompt self.prompts[i], their rewards and advantages, and the log-probs the update compares with."""
        cfg, G = self.cfg, self.group_size
        pad, eos = self.hparams.pad_id, self.hparams.eos_id
        prompts = [self.prompts[i] for i in indices]
        ids, mask = left_pad(prompts, pad, self.device)
        gen = generate(
            self.actor,
            ids,
            mask,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,  # no top-k / top-p: the log-probs are of this distribution
            eos_id=eos,
            pad_id=pad,
            generator=generator if generator is not None else self.sample_generator(self.iteration),
            num_samples=G,
        )
        response, response_mask = truncate_after_eos(gen.tokens, gen.mask, eos, pad)
        lengths = response_mask.sum(1).tolist()
        sequences = [prompts[r // G] + response[r, :n].tolist() for r, n in enumerate(lengths)]
        prompt_lens = [len(prompts[r // G]) for r in range(len(sequences))]
        m = response_mask.float()
        width = response.size(1)

        rows = [self.prompt_rows[i] for i in indices for _ in range(G)]
        rm = self.rm_scores_packed(sequences, prompt_lens) if self.uses_rm() else None
        rewards, per_source = self.source_rewards(rows, self.decode(response, response_mask), rm)
        if cfg.missing_eos_penalty:
            rewards = torch.where(gen.finished, rewards, rewards - cfg.missing_eos_penalty)
        sampled = gen.logprobs * m
        ref = self.frozen_logprobs(self.reference, sequences, prompt_lens, width) if cfg.kl_coef > 0 else None
        signal = rewards
        if cfg.kl_in == "reward" and ref is not None:  # PPO's leash: the response's summed KL comes off its reward before the baseline
            signal = kl_in_reward(rewards, sampled, ref, m, cfg.kl_coef, cfg.kl_estimator)
        self.check_finite("rewards", signal)
        advantages = group_advantages(signal, G, cfg.baseline)  # per group: groups never span ranks, so no all-reduce
        single_step = int(cfg.updates_per_rollout) == 1 and int(cfg.minibatch_size) >= len(indices)
        old = None if single_step else self.frozen_logprobs(self.actor, sequences, prompt_lens, width)  # TRL skips it too: old = new, detached
        return GroupRollout(sequences, prompt_lens, response, m, gen.finished, rewards, per_source, advantages, sampled, old, ref)

    # -- one GRPO iteration -----------------------------------------------------------------------

    def training_step(self, batch, batch_idx):
        """One GRPO iteration: grouped rollout (rewards and advantages), update, logging; evaluation and checkpoint at their intervals."""
        if self.iteration >= self.cfg.iterations:  # a resumed run whose loop replays batches it already did
            self.trainer.should_stop = True
            return
        started = time.perf_counter()
        roll = self.rollout(self.prompt_indices(self.iteration))
        rollout_s = time.perf_counter() - started
        update_started = time.perf_counter()
        stats = self.update(roll)
        update_s = time.perf_counter() - update_started
        self.log_iteration(roll, stats, rollout_s, update_s)
        self.iteration += 1
        if self.iteration % self.cfg.eval_every == 0 or self.iteration == self.cfg.iterations:
            self.evaluate()
        if self.iteration % self.cfg.save_every == 0:
            self.save_last()

    def update(self, roll: GroupRollout) -> dict[str, torch.Tensor]:
        """updates_per_rollout passes of clipped-ratio steps over shuffled minibatches of whole groups; the mean of each statistic."""
        cfg, G = self.cfg, self.group_size
        opt = self.optimizers()
        B, width = len(roll.sequences) // G, roll.mask.size(1)
        mb = min(int(cfg.minibatch_size), B)
        kl_in_loss = cfg.kl_coef if cfg.kl_in == "loss" else 0.0
        stats: dict[str, list[torch.Tensor]] = {}
        for step in range(int(cfg.updates_per_rollout)):
            order = torch.randperm(B, generator=torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + self.iteration * 101 + step))
            for start in range(0, B, mb):
                rows = [b * G + g for b in order[start : start + mb].tolist() for g in range(G)]
                idx = torch.tensor(rows, device=self.device)
                m, advantages = roll.mask[idx], roll.advantages[idx]
                new, entropy = self.response_logprobs(self.training_actor, self.packed(roll.sequences, roll.prompt_lens, rows), len(rows), width, entropy=True)
                old = new.detach() if roll.old_logprobs is None else roll.old_logprobs[idx]
                ref = roll.ref_logprobs[idx] if roll.ref_logprobs is not None else None
                loss, loss_stats = grpo_loss(new, old, ref, advantages, m, cfg.clip_ratio, kl_in_loss, cfg.loss_norm, cfg.clip_ratio_high)
                self.check_finite("loss", loss)
                opt.zero_grad()
                self.manual_backward(loss)
                self.clip_gradients(opt, gradient_clip_val=cfg.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
                with torch.no_grad():  # TRL's split of the clip fraction: where the clip binds, by the advantage's sign
                    ratio = torch.exp(new.detach() - old)
                    high = cfg.clip_ratio if cfg.clip_ratio_high is None else cfg.clip_ratio_high
                    low_clipped = ((ratio < 1 - cfg.clip_ratio) & (advantages[:, None] < 0)).float()
                    high_clipped = ((ratio > 1 + high) & (advantages[:, None] > 0)).float()
                    step_stats = {
                        "loss": loss.detach(),
                        "entropy": masked_mean(entropy, m),
                        "clip_low": masked_mean(low_clipped, m),
                        "clip_high": masked_mean(high_clipped, m),
                        "clip_region": masked_mean(torch.maximum(low_clipped, high_clipped), m),
                        **loss_stats,
                    }
                for k, v in step_stats.items():
                    stats.setdefault(k, []).append(v)
        self.lr_schedulers().step()
        return {k: torch.stack(v).mean() for k, v in stats.items()}

    def log_iteration(self, roll: GroupRollout, mean: dict[str, torch.Tensor], rollout_s: float, update_s: float) -> None:
        """The iteration's figures under TRL's GRPOTrainer names, averaged over the ranks (one all-reduce)."""
        G, m = self.group_size, roll.mask
        B = len(roll.sequences) // G
        lengths = m.sum(1)
        local = {
            "reward": roll.rewards.mean(),
            "reward_std": roll.rewards.std(),
            **{f"rewards/{name}/mean": r.mean() for name, r in roll.per_source.items()},
            **{f"rewards/{name}/std": r.std() for name, r in roll.per_source.items()},
            "frac_reward_zero_std": torch.tensor(zero_signal_groups(roll.rewards, G) / B),
            "completions/mean_length": lengths.mean(),
            "completions/clipped_ratio": (~roll.finished).float().mean(),  # stopped by the length limit, not by EOS
            "entropy": mean["entropy"],
            "clip_ratio/low_mean": mean["clip_low"],
            "clip_ratio/high_mean": mean["clip_high"],
            "clip_ratio/region_mean": mean["clip_region"],
            "policy/approxkl_avg": mean["approxkl"],
            "val/ratio": mean["ratio"],
            "loss/policy_avg": mean["loss"],
        }
        if "kl" in mean:  # the mean per-token k3 KL to the reference, as TRL logs it (with a reference only)
            local["kl"] = mean["kl"]
        if roll.ref_logprobs is not None:  # the sampled sequence KL of the rollout, in nats per response
            local["objective/kl"] = ((roll.sampled_logprobs - roll.ref_logprobs) * m).sum(1).mean()
        names = list(local)
        figures = dict(zip(names, self.world_mean(torch.stack([v.float().to(self.device) for v in local.values()])).tolist()))
        world = self.trainer.world_size
        episodes, gen_tokens = len(roll.sequences) * world, float(self.world_sum(lengths.sum().float()))
        figures.update(
            {
                "time/rollout_s": rollout_s,
                "time/update_s": update_s,
                "perf/gen_tokens_per_s": gen_tokens / max(rollout_s, 1e-9),
                "perf/episodes_per_s": episodes / max(rollout_s + update_s, 1e-9),
            }
        )
        for k, v in (("episodes", episodes), ("gen_tokens", gen_tokens), ("rollout_s", rollout_s), ("update_s", update_s), ("iterations", 1)):
            self.totals[k] += v
        self.log_dict(figures)

    # -- evaluation ------------------------------------------------------------------------------

    def eval_answers(self, prompts: list) -> tuple[list[str], dict[str, torch.Tensor]]:
        """Greedy answers, their reward under the configured sources (no missing-EOS penalty) and, with an rm source, their RM score."""
        seqs, att, _, _, texts = self.greedy([prompt_ids(self.tokenizer, p) for p in prompts])
        rm = rm_scores(self.reward_model, seqs, att, self.hparams.reward_norm, self.cfg.scale_reward_by_std) if self.uses_rm() else None
        rewards, _ = self.source_rewards(list(prompts), texts, rm)
        return texts, {"eval/reward": rewards, **({"eval/rm_score": rm} if rm is not None else {})}

    def sampled_kl(self, prompts: list) -> torch.Tensor:
        """KL(policy || reference) in nats per response, one sampled response per prompt (the curve's x-axis, as PPO's)."""
        return self.kl_to_reference([prompt_ids(self.tokenizer, p) for p in prompts])

    # -- optimiser and checkpoint state ------------------------------------------------------------

    def configure_optimizers(self):
        o = self.hparams.optim
        fused = torch.cuda.is_available() and next(self.actor.parameters()).is_cuda
        actor = torch.optim.AdamW(decay_param_groups(self.actor, o["weight_decay"]), lr=o["lr"], betas=tuple(o["betas"]), eps=1e-5, fused=fused or None)
        total = self.cfg.iterations
        anneal = self.cfg.anneal_lr
        return [actor], [torch.optim.lr_scheduler.LambdaLR(actor, lambda it: max(0.0, 1.0 - it / max(1, total)) if anneal else 1.0)]

    def extra_state(self) -> dict:
        return {"totals": dict(self.totals)}

    def load_extra_state(self, state: dict) -> None:
        self.totals = dict(state["totals"])


# ---------------------------------------------------------------------------------------------
# The stage


def check_gold_prompts(sources: list[RewardSource], rows: list, source: str) -> None:
    """The gold judge knows the embedded task's instructions only: refuse other prompts before the first rollout."""
    if not any(s.kind == "gold" for s in sources) or not rows:
        return
    try:
        default_task().gold_score(prompt_text(rows[0]), "")
    except ValueError as error:
        raise UserError(f"grpo.reward=gold scores the embedded task's prompts only, and {source} [train] row 0 is not one of them ({error}): use rm or a reward function") from error


def run(cfg: DictConfig, run_dir: Path) -> dict:
    started = time.time()
    sources = parse_reward_sources(cfg.grpo.reward, cfg.grpo.reward_weights)  # a bad function fails here, before any model loads
    pl.seed_everything(cfg.seed, workers=True)
    root = Path(cfg.paths.root)
    actor, tokenizer, actor_payload, actor_path = runs.load_start(cfg.init_from, STAGES["grpo"].starts_from, root, "grpo", run_name=run_dir.name)
    if actor_payload.get("kind") == "scalar":
        raise UserError(f"init_from={actor_path} is a reward model (a scalar head), not a policy: GRPO's policy starts from an SFT run")
    use_rm = any(s.kind == "rm" for s in sources)
    reward_model = reward_payload = reward_path = None
    if use_rm:
        reward_model, reward_payload, reward_path = load_reward_model(cfg, "grpo", STAGES["grpo"].inputs["reward_from"], tokenizer, actor, actor_path, run_dir.name)
    elif cfg.reward_from:
        log.warning("grpo: reward_from=%s is not used: grpo.reward=%s names no reward model (rm)", cfg.reward_from, [s.name for s in sources])
    parents = runs.parent_record(init_from=actor_path, **({"reward_from": reward_path} if use_rm else {}))
    runs.check_parents(run_dir, parents)
    max_prompt = actor.config.block_size - cfg.grpo.max_new_tokens
    if max_prompt < 1:
        raise UserError(f"grpo.max_new_tokens={cfg.grpo.max_new_tokens} leaves no room for a prompt in the policy's context of {actor.config.block_size} tokens (init_from={actor_path})")
    prompts, rows, eval_prompts, source = load_prompts(cfg, tokenizer, max_prompt, "grpo")
    check_prompt_count(len(prompts), int(cfg.grpo.prompts_per_rollout), planned_world_size(cfg), source, "grpo.prompts_per_rollout")
    check_gold_prompts(sources, rows, source)

    module = GRPOModule(
        actor_config=actor.config.to_dict(),
        reward_config=reward_model.config.to_dict() if use_rm else None,
        grpo=OmegaConf.to_container(cfg.grpo, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        reward_norm=reward_normaliser(reward_payload) if use_rm else {},
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        seed=cfg.seed,
        shared_reference=lora_settings(cfg) is not None,
        compile=bool(cfg.model.get("compile", False)),
    )
    module.actor.load_state_dict(actor.state_dict())
    peft_callbacks = apply_peft(cfg, module, "actor")  # peft=lora / qlora: adapters on the actor; the reference is the actor with them off
    memory_levers(cfg, module.actor)  # the trained model; the reference and the reward model record no gradients
    if not peft_callbacks:
        module.reference.load_state_dict(actor.state_dict())
    if use_rm:
        module.reward_model.load_state_dict(reward_model.state_dict())
    module.prompts, module.prompt_rows, module.eval_prompts, module.tokenizer, module.sources = prompts, rows, eval_prompts, tokenizer, sources
    if uses_gold(cfg):
        module.gold_fn = default_task().gold_score
    iterations = int(cfg.grpo.iterations)
    g = cfg.grpo
    log.info(
        "grpo: %d prompts from %s; actor %s; reward %s; %d iterations of %d prompts x %d samples (baseline %s, KL %s in the %s)",
        len(prompts), source, actor_path, " + ".join(f"{s.weight:g} x {s.name}" for s in sources), iterations, g.prompts_per_rollout, g.group_size, g.baseline, g.kl_coef, g.kl_in,
    )

    trainer, start_point, final_point = fit_online(cfg, run_dir, module, iterations, [actor_path, *([reward_path] if use_rm else [])], len(prompts), source, peft_callbacks)
    if not trainer.is_global_zero:
        return {}
    totals = module.totals
    counted = max(1, totals["iterations"])
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics = {
        "stage": "grpo",
        "data": source,
        "init_from": str(actor_path),
        **({"reward_from": str(reward_path)} if use_rm else {}),
        "parents": parents,
        "reward": [s.name for s in sources],
        "train/iterations": module.iteration,
        "train/episodes": totals["episodes"],
        "start/reward": start_point.get("eval/reward"),
        "final/reward": final_point.get("eval/reward"),
        **({"start/rm_score": start_point.get("eval/rm_score"), "final/rm_score": final_point.get("eval/rm_score")} if use_rm else {}),
        "final/kl": final_point.get("eval/kl"),
        "objective/kl": logged.get("objective/kl"),
        "time/rollout_s_per_iteration": totals["rollout_s"] / counted,
        "time/update_s_per_iteration": totals["update_s"] / counted,
        "perf/gen_tokens_per_s": totals["gen_tokens"] / max(totals["rollout_s"], 1e-9),
        "perf/episodes_per_s": totals["episodes"] / max(totals["rollout_s"] + totals["update_s"], 1e-9),
        "history": module.history,
        "time/total_s": time.time() - started,
    }
    if "eval/gold_score" in start_point:
        metrics["gold/start"] = start_point["eval/gold_score"]
        metrics["gold/final"] = final_point["eval/gold_score"]
    finish(run_dir, module.actor, tokenizer, metrics, trainer, kind="lm", stage="grpo", base=actor_path)
    return metrics
