"""The newcomer's surface: `--help` everywhere, and a built wheel that works outside the checkout."""
import dataclasses
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
from conftest import REPO

from train.config import Config, help_text

BENCH = sorted(p.name for p in (REPO / "bench").glob("*.py") if not p.name.endswith("common.py") and p.name != "__init__.py")


def test_main_help_lists_every_key_with_type_and_default_and_exits_0(tmp_path):
    text = help_text()
    for f in dataclasses.fields(Config):
        assert f"  --{f.name} " in text, f.name
    assert "--epochs INT  (default: 60)" in text and "mixnn_paper.yaml" in text and "examples:" in text
    for flag in ("--help", "-h"):
        result = subprocess.run([sys.executable, str(REPO / "train" / "main.py"), flag, "--epochs", "3"],
                                capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 0 and result.stdout == text and not result.stderr.strip(), result.stderr
    assert not list(tmp_path.iterdir())  # nothing prepared, no run folder


@pytest.mark.parametrize("script", ["train/evaluate.py", "train/report.py", *[f"bench/{b}" for b in BENCH]])
def test_every_script_has_help(script, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0 and "usage" in result.stdout.lower(), result.stderr[-2000:]


def test_wheel_installs_outside_the_checkout_and_runs_the_default_job(tmp_path):
    """Build the wheel, install it (no dependencies) into a brand-new venv that borrows this environment's
    packages, and run from an empty folder: `noisymix-train --help`, then 2 digits epochs."""
    dist, source = tmp_path / "dist", tmp_path / "source"  # built from a copy: setuptools writes build/ beside it
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "runs", "shards", "build", "*.egg-info",
                                                                "__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist),
                            str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(dist.glob("noisymix-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("data", "index", "train", "train/methods"):
        assert f"{package}/__init__.py" in names, package
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co, not the checkout
    python = venv / "bin" / "python"
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import train, train.methods; print(train.__file__, train.__version__)"],
                           capture_output=True, text=True, cwd=empty, env=env, timeout=120)
    assert where.returncode == 0 and str(site) in where.stdout and str(REPO) not in where.stdout, where
    helped = subprocess.run([str(venv / "bin" / "noisymix-train"), "--help"], capture_output=True, text=True,
                            cwd=empty, env=env, timeout=120)
    assert helped.returncode == 0 and "--method STR" in helped.stdout, helped.stderr[-2000:]
    trained = subprocess.run([str(venv / "bin" / "noisymix-train"), "--epochs", "2", "--progress", "false"],
                             capture_output=True, text=True, cwd=empty, env=env, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    runs = list((empty / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "final.json").is_file() and "noisymix_version" in (runs[0] / "final.json").read_text()
