"""The benchmark scripts run end to end on tiny inputs and print their result lines.

Their figures are not checked (speed belongs in the benchmarks, not in tests); that they still run
against the current code is. bench/linedet.py needs ../shared and is not run here.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from operators.model import load_line_preprocessor, load_trocr
from pipeline.cli import main
from pipeline.train.data import read_line_folder

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def bench_module(name: str):
    """``bench/<name>.py`` imported as a module, to call its functions in this process."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", PROJECT_ROOT / "bench" / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(*argv: str, timeout: int = 600) -> str:
    done = subprocess.run([sys.executable, *argv], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/bin:/bin", "RAY_ADDRESS": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_recognize_bench_ends_with_its_ratio_line(tiny_model, capsys):
    recognize = bench_module("recognize")  # in this process
    assert recognize.main(["--model", str(tiny_model), "--lines", "4", "--max-new-tokens", "4"]) == 0
    assert re.fullmatch(r"speedup_vs_hf_batched=\d+\.\d\d speedup_vs_naive=\d+\.\d\d identical=true",
                        capsys.readouterr().out.strip().splitlines()[-1])


def test_scaling_bench_reports_stage_costs_and_the_whole_job_per_core_count(ray_local, tiny_model, capsys):
    # in this process, so the whole job runs on the session's Ray instance (a private one pinned to the cores
    # is the benchmark's own business); one core count: a second would repeat the same job
    scaling, threads = bench_module("scaling"), torch.get_num_threads()
    try:
        assert scaling.main(["--documents", "1", "--dpi", "100", "--model", str(tiny_model), "--max-new-tokens", "4",
                             "--cores", "2", "--set", "recognize.line_batch_size=8"]) == 0
    finally:
        torch.set_num_threads(threads)  # the benchmark reads its stages on one thread
    out = capsys.readouterr().out
    stages = re.findall(r"^(\w+)\s+\d+\.\d{3}\s+\d+\.\d{3}\s+[\d.]+%$", out, flags=re.MULTILINE)
    assert stages == ["triage", "rasterize", "layout", "crop", "recognize", "write", "total"]
    whole_job = re.findall(r"^\d+ cores? ?: .*$", out, flags=re.MULTILINE)
    assert len(whole_job) == 1 and re.fullmatch(r"2 cores: \d+\.\d{3} pages/s", whole_job[0]), whole_job


def test_train_sweep_runs_each_variant_and_tabulates_it(tmp_path, tiny_model):
    lines = tmp_path / "lines"
    assert main(["synth", "lines", "--output", str(lines), "--count", "8", "--seed", "3"]) == 0
    base = {"base_model": str(tiny_model), "output_dir": "unused", "work_dir": "unused",
            "train_data": [{"kind": "folder", "path": str(lines)}], "validation_data": [{"kind": "folder", "path": str(lines)}],
            "steps": 2, "batch_size": 4, "validate_every": 2, "checkpoint_every": 2, "torch_threads": 1}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    out = run_bench("bench/train_sweep.py", "--config", str(tmp_path / "base.yaml"), "--minutes", "5",
                    "--out", str(tmp_path / "sweep"), "--variant", "slow:learning_rate=1e-5",
                    "--variant", "fast:learning_rate=1e-3;batch_size=2")
    rows = {line.split()[0]: line.split()[1:] for line in out.strip().splitlines()[1:]}
    assert set(rows) == {"slow", "fast"}
    assert all(exit_code == "0" and step == "2" for exit_code, step, _loss, _cer in rows.values())
    fast = yaml.safe_load((tmp_path / "sweep" / "fast" / "config.yaml").read_text())
    assert (fast["learning_rate"], fast["batch_size"]) == (1e-3, 2)
    assert (tmp_path / "sweep" / "fast" / "model" / "model.safetensors").is_file()


def test_accuracy_bench_scores_page_cer_and_bag_of_words_after_one_normalisation():
    accuracy = bench_module("accuracy")
    assert accuracy.normalize("Die  Berliniſche\nMonat⸗ ſchrift^ ﬁne") == "Die Berlinische Monat- schrift fine"
    assert accuracy.normalize("_Chez l’ami ~~~ d'Arthur") == "Chez l'ami d'Arthur"
    assert accuracy.normalize("Aufkla\u0364rung Unmu\u0364ndigkeit") == accuracy.normalize("Aufklärung Unmündigkeit")
    # one column read in the other order: page CER counts it, the bag of words does not
    cer, bow = accuracy.score(["alpha beta\ngamma delta"], ["gamma delta alpha beta"])
    assert cer > 0.5 and bow == 0.0
    cer, bow = accuracy.score(["one two three four"], ["one two three"])
    assert round(cer, 3) == round(5 / 18, 3) and round(bow, 3) == round(1 - 6 / 7, 3)


def test_gpu_pack_sends_lines_at_the_model_height_and_brings_the_model_back(tmp_path, tiny_model):
    for split, count in (("lines", 3), ("val", 2)):
        assert main(["synth", "lines", "--output", str(tmp_path / "data" / split / "demo"), "--count", str(count),
                     "--seed", "5"]) == 0
    config = {"base_model": str(tiny_model), "output_dir": "unused", "work_dir": "unused", "steps": 1,
              "train_data": [{"kind": "folder", "path": "../shared/data/train/lines/demo"}],
              "validation_data": [{"kind": "folder", "path": "../shared/data/train/val/demo"}]}
    (tmp_path / "gpu.yaml").write_text(yaml.safe_dump(config))
    # a second config fine-tunes the first one's output: that base is trained there, not sent
    (tmp_path / "next.yaml").write_text(yaml.safe_dump({**config, "base_model": "unused", "output_dir": "unused2"}))
    gpu_pack = bench_module("gpu_pack")  # its commands, in this process
    assert gpu_pack.main(["pack", "--config", str(tmp_path / "gpu.yaml"), "--config", str(tmp_path / "next.yaml"),
                          "--data", str(tmp_path / "data"), "--out", str(tmp_path / "pack")]) == 0
    assert [path.name for path in (tmp_path / "pack" / "base").iterdir()] == [tiny_model.name]
    with tarfile.open(tmp_path / "pack" / "lines.tgz") as archive:
        archive.extractall(tmp_path / "sent", filter="data")
    sent = read_line_folder(tmp_path / "sent" / "lines" / "demo")
    originals = read_line_folder(tmp_path / "data" / "lines" / "demo")
    height = load_line_preprocessor(str(tiny_model)).input_size[0]
    assert [line.text for line in sent] == [line.text for line in originals]
    assert {Image.open(line.path).height for line in sent} == {height}
    assert len(read_line_folder(tmp_path / "sent" / "val" / "demo")) == 2

    assert gpu_pack.main(["restore", str(tmp_path / "pack" / "base" / tiny_model.name), str(tmp_path / "base")]) == 0
    assert gpu_pack.main(["ship", str(tmp_path / "base"), str(tmp_path / "shipped")]) == 0
    assert all(part.stat().st_size <= 12 * 1024 * 1024 for part in (tmp_path / "shipped").iterdir())
    assert gpu_pack.main(["restore", str(tmp_path / "shipped"), str(tmp_path / "back")]) == 0
    load_trocr(str(tmp_path / "back"), device="cpu")
    before, after = load_file(tiny_model / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[name], after[name], rtol=1e-3, atol=1e-4) for name in before)
