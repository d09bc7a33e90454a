"""pipeline: the InstructGPT recipe (pretrain -> SFT -> reward model -> PPO) on Lightning and Hydra."""

from pathlib import Path

from pipeline.errors import UserError


def _config_dir() -> Path:
    """The Hydra configs: the copy that a wheel installs as pipeline/conf (see pyproject.toml), else the
    source checkout's conf/ beside this package, which is where a checkout and an editable install find them."""
    here = Path(__file__).resolve().parent
    installed = here / "conf"
    return installed if (installed / "config.yaml").is_file() else here.parent / "conf"


CONF_DIR = _config_dir()

__all__ = ["CONF_DIR", "UserError"]
