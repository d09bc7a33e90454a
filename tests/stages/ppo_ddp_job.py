"""A 2-process DDP PPO job on the toy problem of test_ppo.py, driven by tests/stages/test_ppo_ddp.py.

    python ppo_ddp_job.py OUT ITERATIONS [--die-after K] [--nan-rank R --nan-at K]

Each rank writes OUT/rank<R>.pt (its actor's weights and kl_coef) when the run ends. --die-after
kills the whole job (every rank, SIGKILL) right after iteration K's checkpoint, as a preempted
cluster job dies; --nan-rank makes one rank's rewards NaN from iteration K on.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from pipeline.errors import UserError  # noqa: E402
from pipeline.stages.ppo import Iterations  # noqa: E402
from test_ppo import count_target, toy_module  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("iterations", type=int)
    parser.add_argument("--die-after", type=int, default=0)
    parser.add_argument("--nan-rank", type=int, default=-1)
    parser.add_argument("--nan-at", type=int, default=0)
    args = parser.parse_args()

    # An adaptive KL controller with a low target moves kl_coef every iteration: a rank that moved its own would show.
    module = toy_module(iterations=args.iterations, rollout_batch_size=16, minibatch_size=8, adaptive_kl=True, kl_coef=0.1, target_kl=0.5, horizon=100, save_every=1)

    def reward(sequences, attention, response, response_mask):
        scores = count_target(sequences, attention, response, response_mask)
        if module.trainer.global_rank == args.nan_rank and module.iteration >= args.nan_at:
            scores = scores * float("nan")
        return scores

    module.reward_fn = reward

    class DieAfter(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if args.die_after and pl_module.iteration == args.die_after and trainer.is_global_zero:
                os.killpg(os.getpgid(0), signal.SIGKILL)  # every rank at once, mid-run

    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=args.iterations,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, default_root_dir=str(args.out), callbacks=[DieAfter()],
    )
    (args.out / "checkpoints").mkdir(parents=True, exist_ok=True)
    last = args.out / "checkpoints" / "last.ckpt"
    loader = DataLoader(Iterations(args.iterations), batch_size=1, collate_fn=lambda items: items[0])
    try:
        trainer.fit(module, loader, ckpt_path=str(last) if last.is_file() else None, weights_only=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    state = {"actor": module.actor.state_dict(), "critic": module.critic.state_dict(), "kl_coef": module.kl_ctl.value, "iteration": module.iteration}
    torch.save(state, args.out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
