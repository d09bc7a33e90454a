"""A 2-process DDP GRPO job on the toy problem of test_grpo.py, driven by tests/stages/test_grpo_ddp.py.

    python grpo_ddp_job.py OUT ITERATIONS [--fail-rank R --fail-at K]

After each iteration every rank writes OUT/rank<R>.pt: its actor's weights, the iteration and the
prompts it drew so far. --fail-rank makes that rank's reward function raise from iteration K on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from pipeline.errors import UserError  # noqa: E402
from pipeline.rewards import RewardSource  # noqa: E402
from pipeline.rl import Iterations  # noqa: E402
from test_grpo import count_target, toy_module  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("iterations", type=int)
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("--fail-at", type=int, default=0)
    args = parser.parse_args()

    # Several shuffled minibatches and two passes: every rank takes the same number of steps, DDP averages each.
    module = toy_module(iterations=args.iterations, prompts_per_rollout=4, minibatch_size=2, updates_per_rollout=2, save_every=1)

    def graded(prompts, completions, **kwargs):
        if module.trainer.global_rank == args.fail_rank and module.iteration >= args.fail_at:
            raise RuntimeError(f"the grader is down on rank {args.fail_rank}")
        return count_target(prompts, completions)

    module.sources = [RewardSource("graded", "function", graded)]

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            drawn = [pl_module.prompt_indices(i) for i in range(pl_module.iteration)]
            state = {"actor": pl_module.actor.state_dict(), "iteration": pl_module.iteration, "drawn": drawn}
            torch.save(state, args.out / f"rank{trainer.global_rank}.pt")

    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=args.iterations,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, default_root_dir=str(args.out), callbacks=[Record()],
    )
    (args.out / "checkpoints").mkdir(parents=True, exist_ok=True)
    loader = DataLoader(Iterations(args.iterations), batch_size=1, collate_fn=lambda items: items[0])
    try:
        trainer.fit(module, loader, weights_only=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
