"""The stages, and the one registry of them.

The contract every stage keeps (written here once, for all of them):

- A stage is one module here with `run(cfg, run_dir) -> metrics`. `cfg` is the composed Hydra config
  of `conf/stage/<name>.yaml` over the root config; `run_dir` is the stage run's own directory
  (`outputs/<stage>/<run name>/`). `run` returns the stage's final figures, which it has also
  written to `run_dir/metrics.json` last (the file that marks the run finished).
- A stage imports the library below it (`pipeline.model`, `pipeline.losses`, `pipeline.data`,
  `pipeline.tasks`, `pipeline.training`, `pipeline.runs`, ...) and this registry, never another
  stage: what two stages share lives in the library.
- A stage that starts from another stage's model finds it through `starts_from` below: `init_from=`
  when the user gives it, else the newest finished run of the first of those stages that has one.
  Other parent models (PPO's reward model) are named in `inputs`: a config key and its stages.
- Bad input raises `pipeline.errors.UserError` with a message naming the file, row, column or key.

Adding a stage is one module here, one `conf/stage/<name>.yaml` and one line in STAGES
(tests/stages/test_registry.py checks that the three agree).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType

RECIPE_RUNNER = "all"  # conf/stage/all.yaml: `python -m pipeline` runs the recipe (conf/recipe/) stage by stage


@dataclass(frozen=True)
class Stage:
    name: str
    starts_from: tuple[str, ...] = ()  # the stages whose model this one starts from, first found first
    inputs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # other parents: config key -> stages
    trains: bool = True  # trains the model.pt it writes (generate, export and serve only read one; quantize converts one for them)
    policy: bool = False  # its model.pt is a language model that answers prompts
    chat: bool = False  # its policy answers through the chat template (instruction-tuned)
    # The report's line for the stage: {key} is a metrics.json figure, {a|b} the first of the keys it has,
    # {key:N} with N digits, {a|b:split} the split (the part before '/') of the first key it has.
    headline: str = ""
    curves: tuple[str, ...] = ("train/loss", "val/loss")  # the report's loss panel, from history.jsonl
    steps: str = "train/steps"  # the report's steps column
    speed: str = "perf/tokens_per_s"  # the report's tokens/s column

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"{__name__}.{self.name}")


_POLICIES = ("ppo", "grpo", "dpo", "sft", "pretrain")  # the most trained first: what generate and export take by default

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("pretrain", policy=True, headline="val loss {val/loss} (perplexity {val/ppl:1}; unigram baseline {baseline/unigram_xent})"),
        Stage("sft", starts_from=("pretrain",), policy=True, chat=True, headline="gold score {gold/start} -> {gold/final}; val loss {val/loss}"),
        Stage(
            "reward",
            starts_from=("sft",),
            headline="{test/accuracy|validation/accuracy:split} accuracy {test/accuracy|validation/accuracy}, against the gold judge {test/accuracy_gold|validation/accuracy_gold}",
        ),
        Stage(
            "ppo",
            starts_from=("sft",),
            inputs={"reward_from": ("reward",)},
            policy=True,
            chat=True,
            headline="gold score {gold/start} -> {gold/final}; RM score {start/rm_score} -> {final/rm_score}; KL {final/kl}",
            curves=("loss/policy_avg", "loss/value_avg"),
            steps="train/iterations",
            speed="perf/gen_tokens_per_s",
        ),
        Stage(
            "dpo",
            starts_from=("sft",),
            policy=True,
            chat=True,
            headline="gold score {gold/start} -> {gold/final}; KL {final/kl}; reward accuracy {val/rewards/accuracies}",
            curves=("train/loss", "val/loss"),
        ),
        Stage(
            "grpo",
            starts_from=("sft",),
            inputs={"reward_from": ("reward",)},  # with grpo.reward=rm only
            policy=True,
            chat=True,
            headline="gold score {gold/start} -> {gold/final}; reward {start/reward} -> {final/reward}; KL {final/kl}",
            curves=("loss/policy_avg", "objective/kl"),
            steps="train/iterations",
            speed="perf/gen_tokens_per_s",
        ),
        Stage(
            "distill",
            inputs={"teacher_from": ("ppo", "grpo", "dpo", "sft")},  # the student: init_from= when given, else fresh from the model group
            policy=True,
            chat=True,
            headline="gold score {gold/start} -> {gold/final} (teacher {gold/teacher}); KL to the teacher {kl/start} -> {kl/final}; {params/ratio:2} of its parameters, x{perf/speedup_b1:2} tokens/s at batch 1",
        ),
        Stage(
            "quantize",
            starts_from=_POLICIES,
            trains=False,  # its model.pt is for generate, export and serve to read, never for a stage to train on
            headline="{method}: model.pt {file/ratio:2}x smaller; tokens/s x{perf/speedup_b1:2} at batch 1, x{perf/speedup_b16:2} at 16; gold {gold/float} -> {gold/quant}",
        ),
        Stage(
            "prune",
            starts_from=_POLICIES,
            policy=True,  # chat or not as its source: model.pt records the source's stage
            headline="{method}: {params/ratio:2} of the parameters; gold {gold/source} -> {gold/pruned} pruned -> {gold/final}; KL {kl/final}; x{perf/speedup_b1:2} tokens/s at batch 1",
        ),
        Stage("export", starts_from=_POLICIES, trains=False),
        Stage("generate", starts_from=_POLICIES, trains=False),
        Stage("serve", starts_from=_POLICIES, trains=False),
    )
}


def training_stages() -> list[Stage]:
    """The stages that train a model, in the registry's (the recipe's) order."""
    return [s for s in STAGES.values() if s.trains]
