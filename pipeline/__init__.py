"""pipeline: the InstructGPT recipe (pretrain -> SFT -> reward model -> PPO) on Lightning and Hydra."""

from pipeline.errors import UserError

__all__ = ["UserError"]
