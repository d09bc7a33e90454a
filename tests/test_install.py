"""It installs as a package: the wheel holds every module and every config, and the installed copy runs
a stage from a directory that is not the checkout (the configs come from the wheel, not from conf/)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from helpers import REPO, TINY

# What the build reads: pyproject.toml and what it names (the readme, the package, the configs).
SOURCES = ("pyproject.toml", "README.md", "pipeline", "conf")


def run(*command: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}: exit {result.returncode}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-5000:]}"
    return result


def test_the_wheel_installs_and_runs_a_stage_from_another_directory(tmp_path):
    # Built from a copy: a build writes build/ and *.egg-info beside its sources, and the checkout stays as it is.
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    # Offline: the installed setuptools builds it (no build isolation), and nothing is fetched.
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(wheels), str(source), cwd=tmp_path)
    (wheel,) = wheels.glob("*.whl")
    assert wheel.name.startswith("instructgpt_pipeline-")  # a name of its own on the package index

    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"pipeline/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "pipeline").rglob("*.py") if "__pycache__" not in p.parts}
    # A config group or a subpackage that pyproject.toml's `packages` does not list would be missing here.
    assert configs - names == set(), "add the folder to [tool.setuptools] packages in pyproject.toml"
    assert modules - names == set(), "add the subpackage to [tool.setuptools] packages in pyproject.toml"
    assert "pipeline/conf/hydra/launcher/slurm.yaml" in names and "pipeline/conf/hparams_search/ppo_optuna.yaml" in names

    target = tmp_path / "site"
    run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel), cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "PIPELINE_OUTPUTS": str(tmp_path / "outputs"), "WANDB_MODE": "offline"}
    where = run(sys.executable, "-c", "import pipeline; print(pipeline.__file__); print(pipeline.CONF_DIR)", cwd=elsewhere, env=env)
    module_file, conf_dir = (Path(line) for line in where.stdout.split())
    assert module_file.is_relative_to(target) and conf_dir == target / "pipeline" / "conf"

    result = run(sys.executable, "-m", "pipeline", "stage=pretrain", "trainer.max_steps=5", *TINY, cwd=elsewhere, env=env)
    (run_dir,) = (tmp_path / "outputs" / "pretrain").iterdir()
    assert (run_dir / "metrics.json").is_file() and (run_dir / "model.pt").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert f"pretrain run directory: {run_dir}" in result.stdout
    assert sorted(p.name for p in elsewhere.iterdir()) == []  # nothing written into the working directory
