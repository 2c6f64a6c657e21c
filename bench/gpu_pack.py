"""What a lent GPU machine needs for a training run, packed small enough to travel, and the model back.

The `device` tool sends the working tree (at most 64 MiB) and returns files of at most 16 MB. So:

- ``pack``: the real training and validation lines of the sources the training configs name, with rows
  fitted to the ink at their stored size and then scaled to the base models' input height (the height
  the pipeline reads them at; JPEG); the synthetic-text fonts cut down to the characters the generator
  uses (fontTools, which fpdf2 installs); each config's base model with fp16 weights, in
  ``base/<its folder name>``. The lines keep their
  folder names (in one tar), so the config's ``../shared/data/train/...`` paths resolve once
  ``bench/gpu_session.sh`` puts them there.
- ``restore``: a packed fp16 model as the fp32 checkpoint training starts from (or the pipeline reads).
- ``ship``: a trained model with fp16 weights, as a tar cut into parts that fit the return limit;
  ``restore`` joins them again.

    .venv/bin/python bench/gpu_pack.py pack --config configs/train-printed-small-gpu2.yaml \\
        [--config ...] --data ../shared/data/train --out .gpu
    .venv/bin/python bench/gpu_pack.py restore <returned parts> models/trocr-pipeline-printed-small
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from fontTools import subset
from PIL import Image
from safetensors.torch import load_file, save_file

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from pipeline.synth.corpus import CHARSET  # noqa: E402
from pipeline.synth.fonts import discover_fonts  # noqa: E402
from pipeline.train.config import load_train_config  # noqa: E402
from pipeline.train.data import GT_SUFFIX, read_line_folder  # noqa: E402

WEIGHTS = "model.safetensors"
HALF_WEIGHTS = "model.fp16.safetensors"
SHIPPED = "model.tar"
#: One file, not thousands: the device tool counts the space files take on disk.
LINES_TAR = "lines.tgz"
PART_BYTES = 12 * 1024 * 1024
JPEG_QUALITY = 70


def pack_lines(source: Path, target: Path, height: int) -> int:
    """A line folder's labelled lines, rows fitted to the ink (as training reads them), scaled to ``height``."""
    target.mkdir(parents=True, exist_ok=True)
    lines = read_line_folder(source)
    for line in lines:
        gray = line.load_gray()
        scale = height / gray.shape[0]
        small = Image.fromarray(gray).resize((max(1, round(gray.shape[1] * scale)), height), Image.Resampling.LANCZOS)
        small.save(target / f"{line.path.stem}.jpg", quality=JPEG_QUALITY, optimize=True)
        (target / f"{line.path.stem}{GT_SUFFIX}").write_text(line.text + "\n", encoding="utf-8")
    return len(lines)


def pack_fonts(font_kind: str, target: Path) -> int:
    """The generator's fonts of a kind, subset to CHARSET, as a tar of their /usr/share/fonts paths."""
    paths = sorted({face.path for face in discover_fonts(font_kind)})
    options = subset.Options(layout_features=["*"], name_IDs=["*"], notdef_outline=True)
    with tempfile.TemporaryDirectory() as scratch, tarfile.open(target, "w:gz") as archive:
        for path in paths:
            font = subset.load_font(str(path), options)
            subsetter = subset.Subsetter(options)
            subsetter.populate(text=CHARSET)
            subsetter.subset(font)
            small = Path(scratch) / path.name
            subset.save_font(font, str(small), options)
            archive.add(small, arcname=str(path).lstrip("/"))
    return len(paths)


def half_weights(model: Path, target: Path) -> None:
    """The checkpoint folder with fp16 weights (configs and tokenizer as they are)."""
    target.mkdir(parents=True, exist_ok=True)
    for path in model.iterdir():
        if path.is_file() and path.name != WEIGHTS and path.name != "README.md":
            shutil.copyfile(path, target / path.name)
    tensors = {name: tensor.half() if tensor.is_floating_point() else tensor
               for name, tensor in load_file(model / WEIGHTS).items()}
    save_file(tensors, target / HALF_WEIGHTS, metadata={"format": "pt"})


def restore(packed: Path, target: Path) -> None:
    """A packed model (a folder with fp16 weights, or the parts ``ship`` cut) as an fp32 checkpoint folder."""
    with tempfile.TemporaryDirectory() as scratch:
        parts = sorted(packed.glob(f"{SHIPPED}.part*"), key=lambda path: int(path.name.rsplit("part", 1)[1]))
        if parts:
            joined = Path(scratch) / SHIPPED
            with joined.open("wb") as out:
                for part in parts:
                    out.write(part.read_bytes())
            with tarfile.open(joined) as archive:
                archive.extractall(scratch, filter="data")
            packed = Path(scratch) / "model"
        target.mkdir(parents=True, exist_ok=True)
        tensors = {name: tensor.float() if tensor.is_floating_point() else tensor
                   for name, tensor in load_file(packed / HALF_WEIGHTS).items()}
        save_file(tensors, target / WEIGHTS, metadata={"format": "pt"})
        for path in packed.iterdir():
            if path.is_file() and path.name != HALF_WEIGHTS:
                shutil.copyfile(path, target / path.name)


def ship(model: Path, target: Path) -> None:
    """A trained checkpoint with fp16 weights, as one tar cut into parts of at most PART_BYTES."""
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        half_weights(model, Path(scratch) / "model")
        whole = Path(scratch) / SHIPPED
        with tarfile.open(whole, "w") as archive:
            archive.add(Path(scratch) / "model", arcname="model")
        data = whole.read_bytes()
    for index, start in enumerate(range(0, len(data), PART_BYTES)):
        (target / f"{SHIPPED}.part{index}").write_bytes(data[start:start + PART_BYTES])


def pack(configs: list[Path], data: Path, out: Path) -> None:
    """Everything the training configs need: their line folders, synthetic fonts and bases (by folder name;
    not a base that one of the configs trains first)."""
    from operators.model import load_line_preprocessor  # transformers: seconds that ship and restore do not need

    configs = [load_train_config(path) for path in configs]
    if any(config.base_model is None for config in configs):
        raise SystemExit("every config must fine-tune a local base_model: a model built from scratch is not packed")
    produced = {Path(config.output_dir) for config in configs}
    bases = {Path(config.base_model) for config in configs} - produced  # a base trained in the same call is not sent
    missing = sorted(str(base) for base in bases if not base.is_dir())
    if missing:
        raise SystemExit(f"base models not found here: {missing}")
    heights = {load_line_preprocessor(str(base)).input_size[0] for base in bases}
    if len(heights) != 1:
        raise SystemExit(f"the bases read lines at different heights {sorted(heights)}: pack them one at a time")
    if len({base.name for base in bases}) != len(bases):
        raise SystemExit(f"two bases share a folder name, which names them on the GPU machine: {sorted(map(str, bases))}")
    height = heights.pop()
    out.mkdir(parents=True, exist_ok=True)
    folders = dict.fromkeys(source.path for config in configs for source in config.train_data + config.validation_data
                            if source.kind == "folder")
    with tempfile.TemporaryDirectory() as scratch, tarfile.open(out / LINES_TAR, "w:gz") as archive:
        for folder in folders:
            split = folder.parent.name  # lines or val
            count = pack_lines(data / split / folder.name, Path(scratch) / split / folder.name, height)
            print(f"{split}/{folder.name}: {count} lines")
        for split in sorted(Path(scratch).iterdir()):
            archive.add(split, arcname=split.name)
    for font_kind in sorted({source.font_kind for config in configs for source in config.train_data
                             if source.kind == "synth"}):
        print(f"fonts {font_kind}: {pack_fonts(font_kind, out / f'fonts-{font_kind}.tgz')}")
    for base in bases:
        half_weights(base, out / "base" / base.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pack_command = commands.add_parser("pack")
    pack_command.add_argument("--config", type=Path, action="append", required=True,
                              help="training config whose lines, fonts and base to pack (repeatable)")
    pack_command.add_argument("--data", type=Path, required=True, help="../shared/data/train")
    pack_command.add_argument("--out", type=Path, required=True)
    for name in ("restore", "ship"):
        command = commands.add_parser(name)
        command.add_argument("source", type=Path)
        command.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    if args.command == "restore":
        restore(args.source, args.target)
    elif args.command == "ship":
        ship(args.source, args.target)
    else:
        pack(args.config, args.data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
