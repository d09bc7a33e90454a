"""The console: each thing said once, and only what a user of this pipeline needs.

Lightning gives its loggers a stderr handler of their own when it is imported, and Hydra then gives
the root logger a stdout handler and the run's log file: every Lightning line came out twice.
Lightning also advertises its cloud products, announces defaults that the pipeline chose on purpose
(full checkpoints, resuming into a run's own checkpoint folder), and torch deprecates an API that
Lightning still calls. `setup()` runs at the start of every process of a run, after Hydra configured
logging: the CLI, the recipe's stage processes and Lightning's DDP children all start in
pipeline/__main__.py's main. What stays: the progress bar, the stages' own lines and figures, where
the files went, and every warning that a user can act on.
"""

from __future__ import annotations

import logging
import warnings

# Loggers that Lightning's packages give handlers of their own at import.
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")

# Log lines that tell a user of this pipeline nothing they can act on (matched at the start).
NOISE = (
    "💡 Tip:",  # Lightning's advertisements for its cloud logger and model registry
    "`weights_only` was not set",  # trainer.save_checkpoint without weights_only: our checkpoints are full on purpose
    "`Trainer(val_check_interval=1.0)` was configured",  # PPO's own choice: it evaluates by iteration, not by step
    "TPU available: False",  # accelerators the machine does not have (the GPU line stays: it says what is used)
    "HPU available: False",
)

# Python warnings of the same kind (regular expressions matched at the start of the message).
NOISY_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # torch deprecates what Lightning's _pytree still calls
    r"Checkpoint directory .* exists and is not empty",  # a run resumes into its own checkpoints/ by design
    r"Found \d+ module\(s\) in eval mode at the start of training",  # PPO's frozen reference and reward models
    # Batches (and PPO's own iteration count) resume mid-epoch exactly, through state that Lightning's check does not see.
    r"You're resuming from a checkpoint that ended before the epoch ended",
)

FILE_ONLY = "file_only"  # log.error(..., extra={FILE_ONLY: True}): the run's log file, not the console


class Quiet(logging.Filter):
    """Drops the NOISE lines everywhere, and FILE_ONLY records (or, on rank > 0, INFO) on the console."""

    def __init__(self, console: bool, quiet_info: bool):
        super().__init__()
        self.console = console
        self.quiet_info = quiet_info

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(NOISE):
            return False
        off_console = getattr(record, FILE_ONLY, False) or (self.quiet_info and record.levelno < logging.WARNING)
        return not (self.console and off_console)


def setup() -> None:
    """Lightning's lines through the root logger's handlers alone, noise filtered, once per process.

    On ranks above 0 the console shows warnings and errors only: their INFO lines repeat rank 0's.
    The run's log file keeps everything but the noise. Safe to call again (Hydra may reconfigure).
    """
    # Lightning reads the process's rank from the environment when it is imported.
    from lightning.pytorch.utilities import rank_zero_only

    root = logging.getLogger()
    if root.handlers:  # Hydra's handlers; with hydra/job_logging=none Lightning keeps its own
        for name in LIGHTNING_LOGGERS:
            logger = logging.getLogger(name)
            for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
                logger.removeHandler(handler)
            logger.propagate = True
    quiet_info = getattr(rank_zero_only, "rank", 0) > 0
    handlers = [*root.handlers, *(h for name in LIGHTNING_LOGGERS for h in logging.getLogger(name).handlers)]
    for handler in handlers:
        if not any(isinstance(f, Quiet) for f in handler.filters):
            handler.addFilter(Quiet(console=not isinstance(handler, logging.FileHandler), quiet_info=quiet_info))
    for message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)  # an equal filter replaces itself: no pile-up
