"""The package as ``pip install`` gives it, away from the repository: the wheel had held the code alone, so an
installed copy could not find its bundled models (exit 5) nor its configs."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_an_installed_wheel_finds_its_bundled_models_and_configs_outside_the_repository(tmp_path, synthetic_documents):
    source = tmp_path / "source"  # a copy: a build writes its build/ and egg-info beside the sources
    for folder in ("operators", "pipeline", "models", "configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*-random"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "wheel"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "wheel").glob("*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # the package from the wheel, installed under a prefix of its own (as --user or --prefix do: not the venv's),
    # and the dependencies from this environment (path lines: their .pth files, this repository's editable install
    # among them, are not read)
    prefix = tmp_path / "prefix"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed",
                                "--prefix", str(prefix), str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    packages = prefix / Path(sysconfig.get_path("purelib")).relative_to(sysconfig.get_path("data"))
    venv_packages = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        capture_output=True, text=True, check=True).stdout.strip())
    (venv_packages / "paths.pth").write_text("\n".join([str(packages), *site.getsitepackages(),
                                                         sysconfig.get_path("purelib")]))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    check = ("import operators, pipeline.config as c, operators.settings as s; "
             "print(operators.__file__); print(s.BUNDLED_MODELS['handwritten']); print(c.DEFAULT_CONFIG); "
             "print(c.load_config('cluster-v100.yaml').recognize.accelerator_type)")
    found = subprocess.run([str(python), "-c", check], cwd=outside, env=env, capture_output=True, text=True,
                           timeout=120)
    assert found.returncode == 0, found.stderr
    module, model, config, accelerator = found.stdout.splitlines()
    assert module.startswith(str(packages)) and not module.startswith(str(REPO))
    assert (Path(model) / "model.safetensors").is_file() and Path(model).is_relative_to(prefix)
    assert Path(config).is_file() and Path(config).is_relative_to(prefix) and accelerator == "V100"
    # the bundled model loads: the dry run checks it (its processor and generation settings) before any work; run by
    # the installed command, whose entry point pyproject.toml names
    dry = subprocess.run([str(python), str(prefix / "bin" / "trocr-pipeline"), "run", str(synthetic_documents[0]),
                          "--output", str(tmp_path / "out"), "--dry-run"], cwd=outside, env=env, capture_output=True,
                         text=True, timeout=300)
    assert dry.returncode == 0 and "1 to process" in dry.stdout, dry.stderr
