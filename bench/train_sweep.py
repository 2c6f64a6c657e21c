"""Train several variants of one training config side by side and compare their validation CER.

Each variant is the base YAML with some keys replaced; all run at once as separate
``trocr-pipeline train`` processes (one GPU holds several small models), each stopped by SIGTERM
after ``--minutes`` at the latest. This is how the shipped model's settings were chosen on a lent GPU:

    python bench/train_sweep.py --config configs/train-printed-small.yaml --minutes 8 --out out/sweep \
        --variant lr5e-4:learning_rate=5e-4 --variant 'wide:model.hidden_size=256;learning_rate=5e-4'

A variant is ``NAME:KEY=VALUE;...``; keys are dotted paths into the YAML, values are parsed as YAML.
Every variant writes ``OUT/NAME/{config.yaml,train.log,model/,work/}``; the table at the end gives
each one's last logged step, mean loss and best validation CER.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import read_yaml  # noqa: E402

#: ``trocr-pipeline train`` without the rest of the CLI, whose imports (Ray, poppler bindings) a bare
#: GPU machine may lack.
TRAIN_ONLY = """
import argparse, logging, sys
from pipeline.train.cli import add_train_arguments, train_command
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
parser = argparse.ArgumentParser()
add_train_arguments(parser)
sys.exit(train_command(parser.parse_args()))
"""
VALIDATION_LINE = re.compile(r"step (\d+): loss ([\d.]+), validation CER ([\d.]+)")


def parse_variant(text: str) -> tuple[str, dict[str, object]]:
    name, _, assignments = text.partition(":")
    if not name or not re.fullmatch(r"[\w.-]+", name):
        raise SystemExit(f"variant name must be letters, digits, '.', '_' or '-': {text!r}")
    overrides = {}
    for assignment in filter(None, assignments.split(";")):
        key, sep, value = assignment.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE in variant {name!r}, got {assignment!r}")
        overrides[key.strip()] = parse_value(value)
    return name, overrides


def parse_value(text: str) -> object:
    """YAML, except that 5e-4 is a number (YAML 1.1 reads exponents without a dot as strings)."""
    value = read_yaml(text, "--variant")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def apply_overrides(tree: dict, overrides: dict[str, object]) -> dict:
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def launch(base: dict, name: str, overrides: dict[str, object], out: Path) -> tuple[subprocess.Popen, Path]:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    config = apply_overrides(yaml.safe_load(yaml.safe_dump(base)), overrides)
    config["output_dir"], config["work_dir"] = str(folder / "model"), str(folder / "work")
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    log = folder / "train.log"
    command = [sys.executable, "-c", TRAIN_ONLY, "--config", str(folder / "config.yaml"), "--no-progress"]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT), log


def summarize(log: Path) -> tuple[int, float, float]:
    found = VALIDATION_LINE.findall(log.read_text(errors="replace"))
    if not found:
        return 0, float("nan"), float("nan")
    step, loss, _ = found[-1]
    return int(step), float(loss), min(float(cer) for *_, cer in found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--variant", action="append", required=True, help="NAME:KEY=VALUE;...")
    parser.add_argument("--minutes", type=float, required=True, help="stop every run after this long")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    base = read_yaml(args.config.read_text(), str(args.config))  # a key given twice refused, as train refuses it
    variants = [parse_variant(text) for text in args.variant]
    runs = {name: launch(base, name, overrides, args.out) for name, overrides in variants}
    deadline = time.monotonic() + args.minutes * 60
    while time.monotonic() < deadline and any(process.poll() is None for process, _ in runs.values()):
        time.sleep(5)
    for process, _ in runs.values():
        if process.poll() is None:
            process.terminate()
    for process, _ in runs.values():
        process.wait()

    print(f"{'variant':<24} {'exit':>4} {'step':>6} {'loss':>7} {'best CER':>9}")
    for name, (process, log) in runs.items():
        step, loss, cer = summarize(log)
        print(f"{name:<24} {process.returncode:>4} {step:>6} {loss:>7.4f} {cer:>9.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
