"""Train a TrOCR line recognizer from scratch, or fine-tune a checkpoint, on labelled line images.

Teacher forcing: labels are the tokenized text (padding -> -100); the model shifts them right behind
``decoder_start_token_id`` to build the decoder input and returns the token cross-entropy. The
output folder is a ``save_pretrained`` checkpoint (model + processor) that :func:`load_trocr` reads;
it always holds the model with the best validation CER so far, so a usable model exists at any time.
Checkpoints with optimizer state go to ``work_dir`` and ``--resume`` continues from the newest one.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import jiwer
import numpy as np
import torch
import yaml
from lxml import etree
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from PIL import Image
from tqdm import tqdm
from transformers import TrOCRProcessor, VisionEncoderDecoderModel
from transformers.models.vision_encoder_decoder.modeling_vision_encoder_decoder import shift_tokens_right

from operators.decoding import encode_lines, ink_width_step
from operators.words import fit_rows_to_ink
from pipeline.errors import ConfigError, ExitCode
from pipeline.model import (
    EncoderKind,
    LinePreprocessor,
    TrOCRBundle,
    build_trocr,
    ink_columns,
    load_trocr,
    resolve_device,
    resolve_dtype,
    save_trocr,
)
from pipeline.tokenizer import TokenizerKind, train_tokenizer

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.pt"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSpec(_Frozen):
    """Architecture of a model built from scratch, and its tokenizer trained on the synthetic corpus."""

    encoder: EncoderKind = "vit"
    input_size: tuple[int, int] = Field(default=(32, 768), description="(height, width) of the encoder input")
    patch_size: tuple[int, int] = (16, 8)
    hidden_size: int = Field(default=256, ge=8)
    encoder_layers: int = Field(default=4, ge=1)
    encoder_heads: int = Field(default=4, ge=1)
    decoder_layers: int = Field(default=3, ge=1)
    decoder_heads: int = Field(default=4, ge=1)
    max_target_tokens: int = Field(default=96, ge=4)
    keep_aspect: bool = True
    tokenizer_kind: TokenizerKind = "roberta"
    vocab_size: int = Field(default=512, ge=300)
    tokenizer_corpus_lines: int = Field(default=20000, ge=10, description="synthetic corpus lines to learn it from")
    tokenizer_corpus_seed: int = 0


class DataSource(_Frozen):
    """Labelled lines: a folder of image + .gt.txt, PAGE/ALTO pages, or streamed synthetic lines."""

    kind: Literal["folder", "pages", "synth"]
    path: Path | None = Field(default=None, description="folder or pages: where the files are")
    font_kind: Literal["printed", "handwritten", "all"] = "printed"
    seed: int = Field(default=0, description="synth: the line set; different seeds give disjoint sets")
    count: int | None = Field(default=None, ge=1, description="synth: lines (validation needs it); None = endless")
    augment: bool = Field(default=False, description="folder or pages: vary each real line every time it is drawn")
    weight: float = Field(default=1.0, gt=0, description="share of training batches drawn from this source")

    @model_validator(mode="after")
    def _check(self) -> "DataSource":
        if self.kind != "synth" and self.path is None:
            raise ValueError(f"data source kind {self.kind!r} needs a path")
        return self


class TrainConfig(_Frozen):
    output_dir: Path = Field(description="best model so far, as a save_pretrained folder")
    work_dir: Path = Field(description="checkpoints with optimizer state, for --resume")
    base_model: str | None = Field(default=None, description="checkpoint to fine-tune (hub id or folder)")
    model: ModelSpec | None = Field(default=None, description="or: build this model from scratch")
    train_data: list[DataSource] = Field(min_length=1)
    validation_data: list[DataSource] = []
    steps: int = Field(ge=1, description="optimizer steps; the learning-rate schedule spans them")
    stop_after_step: int | None = Field(default=None, ge=1,
                                        description="end this run early, at this step, on the same schedule")
    batch_size: int = Field(default=32, ge=1)
    grad_accum_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=5e-4, gt=0)
    warmup_steps: int = Field(default=200, ge=0)
    min_lr_ratio: float = Field(default=0.05, ge=0, le=1, description="cosine decay ends at lr * this")
    weight_decay: float = Field(default=0.01, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "fp16", "bf16"] = Field(default="fp32", description="autocast on CUDA")
    checkpoint_every: int = Field(default=500, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    validate_every: int = Field(default=500, ge=1)
    validation_batch_size: int = Field(default=64, ge=1)
    torch_threads: int | None = Field(default=None, ge=1)
    loader_workers: int = Field(default=0, ge=0, description="DataLoader processes making training lines")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if (self.base_model is None) == (self.model is None):
            raise ValueError("give exactly one of base_model (fine-tune) or model (build from scratch)")
        if any(source.kind == "synth" and source.count is None for source in self.validation_data):
            raise ValueError("synthetic validation data needs a count")
        return self


def load_train_config(path: Path) -> TrainConfig:
    try:
        tree = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read training config {path}: {exc}") from exc
    try:
        return TrainConfig.model_validate(tree or {})
    except ValidationError as exc:
        raise ConfigError(f"invalid training config {path}: {exc}") from exc


# --- data -----------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
GT_SUFFIX = ".gt.txt"
#: Synthetic lines are rendered in chunks of this many; DataLoader workers take turns by chunk.
SYNTH_CHUNK = 256
#: Training lines are drawn this many batches at a time and batched by ink width within the draw.
WIDTH_POOL_BATCHES = 8


@dataclass(frozen=True)
class LabeledLine:
    """One line image and its transcription: a file on disk, or pixels already in memory."""

    name: str
    text: str
    source: str
    path: Path | None = None
    pixels: np.ndarray | None = None

    @classmethod
    def in_memory(cls, image: np.ndarray, text: str, name: str, source: str) -> "LabeledLine":
        return cls(name=name, text=text, source=source, pixels=image)

    def load_gray(self) -> np.ndarray:
        """uint8 HxW grayscale pixels (alpha and colour dropped); a file's rows fitted to its ink as the
        pipeline fits the lines it reads (line crops cut with a margin carry a neighbour's descenders)."""
        if self.pixels is not None:
            return self.pixels
        with Image.open(self.path) as image:
            return fit_rows_to_ink(np.asarray(image.convert("L")))


def read_line_folder(folder: Path) -> list[LabeledLine]:
    """Every ``<stem>.gt.txt`` with an image ``<stem>[.more].png|jpg|tif`` beside it (e.g. UW3 ``x.bin.png``)."""
    if not folder.is_dir():
        raise ConfigError(f"line folder {folder} does not exist or is not a folder")
    images_by_stem: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            parts = path.name.split(".")
            for end in range(1, len(parts)):
                images_by_stem.setdefault(".".join(parts[:end]), []).append(path)
    lines = []
    for gt in sorted(folder.glob(f"*{GT_SUFFIX}")):
        candidates = images_by_stem.get(gt.name[: -len(GT_SUFFIX)])
        if candidates:
            image = min(candidates, key=lambda path: len(path.name))
            text = gt.read_text(encoding="utf-8").strip()
            lines.append(LabeledLine(name=image.name, text=text, source=str(folder), path=image))
    return lines


def read_page_lines(path: Path) -> list[LabeledLine]:
    """Lines cut from PAGE or ALTO pages (one XML file, or every .xml in a folder) by their polygons.

    Pixels outside a line's polygon (within its bounding box) are set to white, so neighbouring
    lines' ascenders and descenders do not leak into the crop. Lines without text are skipped.
    """
    lines: list[LabeledLine] = []
    for xml_path in page_xml_files(path):
        image_path, polygons_and_text = read_page_xml(xml_path)
        with Image.open(image_path) as image:
            gray = np.asarray(image.convert("L"))
        for number, (polygon, text) in enumerate(polygons_and_text):
            crop = cut_polygon(gray, polygon)
            if text and crop is not None:  # fitted as the pipeline fits the lines it reads
                lines.append(LabeledLine.in_memory(fit_rows_to_ink(crop), text, f"{xml_path.stem}:{number}",
                                                   str(xml_path)))
    return lines


def page_xml_files(path: Path) -> list[Path]:
    """One PAGE/ALTO file, or every .xml file of a folder."""
    files = sorted(path.glob("*.xml")) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise ConfigError(f"page source {path}: no PAGE/ALTO .xml file found")
    return files


def read_page_xml(xml_path: Path) -> tuple[Path, list[tuple[np.ndarray, str]]]:
    """The page image's path and every text line's (polygon, text), in the file's order."""
    root = etree.parse(str(xml_path)).getroot()
    kind = etree.QName(root).localname
    if kind == "PcGts":
        image_name, polygons_and_text = _page_lines(root)
    elif kind == "alto":
        image_name, polygons_and_text = _alto_lines(root, xml_path)
    else:
        raise ConfigError(f"{xml_path}: root element {kind!r} is neither PAGE (PcGts) nor ALTO (alto)")
    return _page_image_path(xml_path, image_name), polygons_and_text


def _children(element, name: str) -> list:
    return [child for child in element.iter() if isinstance(child.tag, str) and etree.QName(child).localname == name]


def _page_lines(root) -> tuple[str, list[tuple[np.ndarray, str]]]:
    """PAGE: Page/@imageFilename; TextLine/Coords/@points; TextEquiv index 0 (else the first) Unicode."""
    page = _children(root, "Page")[0]
    found = []
    for line in _children(root, "TextLine"):
        coords = [child for child in line if etree.QName(child).localname == "Coords"]
        equivs = [child for child in line if etree.QName(child).localname == "TextEquiv"]
        if not coords or not equivs:
            continue
        chosen = next((equiv for equiv in equivs if equiv.get("index") == "0"), equivs[0])
        unicode = _children(chosen, "Unicode")
        text = (unicode[0].text or "").strip() if unicode else ""
        found.append((_parse_points(coords[0].get("points", "")), text))
    return page.get("imageFilename", ""), found


def _alto_lines(root, xml_path: Path) -> tuple[str, list[tuple[np.ndarray, str]]]:
    """ALTO: fileName; TextLine Shape/Polygon/@POINTS (else its HPOS/VPOS/WIDTH/HEIGHT box); String CONTENTs."""
    unit = _children(root, "MeasurementUnit")
    if unit and (unit[0].text or "").strip() != "pixel":
        raise ConfigError(f"{xml_path}: ALTO MeasurementUnit {unit[0].text!r} is not supported, only pixel")
    file_name = _children(root, "fileName")
    found = []
    for line in _children(root, "TextLine"):
        polygons = _children(line, "Polygon")
        if polygons:
            polygon = _parse_points(polygons[0].get("POINTS", ""))
        else:
            x, y = float(line.get("HPOS", 0)), float(line.get("VPOS", 0))
            width, height = float(line.get("WIDTH", 0)), float(line.get("HEIGHT", 0))
            polygon = np.array([[x, y], [x + width, y], [x + width, y + height], [x, y + height]])
        text = " ".join(string.get("CONTENT", "") for string in _children(line, "String")).strip()
        found.append((polygon, text))
    return (file_name[0].text or "").strip() if file_name else "", found


def _parse_points(points: str) -> np.ndarray:
    """"x,y x,y ..." (PAGE) or "x y x y ..." (ALTO) -> (N, 2) float array."""
    numbers = [float(value) for value in points.replace(",", " ").split()]
    return np.array(numbers[: len(numbers) // 2 * 2]).reshape(-1, 2)


def _page_image_path(xml_path: Path, image_name: str) -> Path:
    folder = xml_path.parent
    candidates = [folder / image_name, folder.parent / image_name, folder / Path(image_name).name]
    image_path = next((path for path in candidates if image_name and path.is_file()), None)
    if image_path is None:
        raise ConfigError(f"{xml_path}: page image {image_name!r} not found next to it")
    return image_path


def cut_polygon(gray: np.ndarray, polygon: np.ndarray) -> np.ndarray | None:
    """The polygon's bounding box with everything outside the polygon white; None if it has no area."""
    if len(polygon) < 3:
        return None
    height, width = gray.shape
    left, top = np.clip(np.floor(polygon.min(axis=0)).astype(int), 0, [width, height])
    right, bottom = np.clip(np.ceil(polygon.max(axis=0)).astype(int) + 1, 0, [width, height])
    if right - left < 2 or bottom - top < 2:
        return None
    mask = np.zeros((bottom - top, right - left), dtype=np.uint8)
    cv2.fillPoly(mask, [np.round(polygon - [left, top]).astype(np.int32)], 255)
    return np.where(mask > 0, gray[top:bottom, left:right], 255).astype(np.uint8)


def read_line_sources(sources: Sequence["DataSource"]) -> list[LabeledLine]:
    """Labelled lines from folder and page sources (synthetic sources are streamed, not read here)."""
    lines: list[LabeledLine] = []
    for source in sources:
        if source.kind == "folder":
            lines += read_line_folder(source.path)
        elif source.kind == "pages":
            lines += read_page_lines(source.path)
    return lines


class TrainingLines(IterableDataset):
    """Endless stream of (resized uint8 image, text) drawn from the sources by weight.

    Synthetic lines continue at ``start_line`` (resume sees new lines); every DataLoader worker of
    every Ray Train rank renders its own chunks, so no two of them repeat each other.
    """

    def __init__(self, sources: Sequence[DataSource], preprocessor: LinePreprocessor, seed: int, start_line: int,
                 shard: tuple[int, int] = (0, 1)):
        self.sources = list(sources)
        self.preprocessor = preprocessor
        self.seed = seed
        self.start_line = start_line
        self.shard = shard

    def __iter__(self) -> Iterator[tuple[np.ndarray, str]]:
        worker = get_worker_info()
        loader_id, loaders = (worker.id, worker.num_workers) if worker else (0, 1)
        rank, world = self.shard
        worker_id, workers = rank * loaders + loader_id, world * loaders
        streams = [_source_stream(source, self.seed, self.start_line, worker_id, workers) for source in self.sources]
        weights = [source.weight for source in self.sources]
        rng = random.Random(self.seed * 1000 + self.start_line + worker_id)
        while True:
            image, text = next(rng.choices(streams, weights)[0])
            yield self.preprocessor.resize(image), text


def _source_stream(source: DataSource, seed: int, start_line: int, worker_id: int, workers: int) -> Iterator[tuple[np.ndarray, str]]:
    if source.kind == "synth":
        return _synth_stream(source, start_line, worker_id, workers)
    return _shuffled_forever(read_line_sources([source]), random.Random(seed + start_line + worker_id), source.augment)


def _synth_stream(source: DataSource, start_line: int, worker_id: int, workers: int) -> Iterator[tuple[np.ndarray, str]]:
    """Synthetic lines in chunks of SYNTH_CHUNK; worker i of n renders chunks i, i+n, ... (no repeats)."""
    from pipeline.synth.lines import iter_lines

    chunk = start_line // SYNTH_CHUNK + worker_id
    while True:
        begin = chunk * SYNTH_CHUNK
        count = SYNTH_CHUNK if source.count is None else min(SYNTH_CHUNK, source.count - begin)
        if count <= 0:
            return
        for image, text, _ in iter_lines(count, source.seed, source.font_kind, start_index=begin):
            yield np.asarray(image), text
        chunk += workers


def _shuffled_forever(lines: list[LabeledLine], rng: random.Random, augment: bool) -> Iterator[tuple[np.ndarray, str]]:
    if not lines:
        raise ConfigError("a training data source has no labelled lines")
    from pipeline.synth.degrade import augment_scan

    pixel_rng = np.random.default_rng(rng.randrange(2**32))
    while True:
        for line in rng.sample(lines, len(lines)):
            gray = line.load_gray()
            yield (augment_scan(gray, pixel_rng) if augment else gray), line.text


def validation_lines(sources: Sequence[DataSource]) -> list[LabeledLine]:
    """Fixed validation set: files from folders/pages, synthetic lines rendered once."""
    lines = read_line_sources([source for source in sources if source.kind != "synth"])
    for source in sources:
        if source.kind == "synth":
            lines += [
                LabeledLine.in_memory(image, text, f"synth-{source.seed}-{index}", f"synth:{source.font_kind}:{source.seed}")
                for index, (image, text) in enumerate(_synth_stream(source, 0, 0, 1))
            ]
    return lines


@dataclass(frozen=True)
class Batch:
    pixels: list[np.ndarray]
    labels: torch.Tensor


class LabelCollator:
    """Tokenize texts into labels: padding -> -100, no leading <s> when the decoder starts with it."""

    def __init__(self, tokenizer, decoder_start_token_id: int, max_target_tokens: int):
        self.tokenizer = tokenizer
        self.drop_bos = decoder_start_token_id == tokenizer.bos_token_id
        self.max_length = max_target_tokens + (1 if self.drop_bos else 0)

    def __call__(self, items: list[tuple[np.ndarray, str]]) -> Batch:
        return Batch([pixels for pixels, _ in items], self.labels([text for _, text in items]))

    def labels(self, texts: list[str]) -> torch.Tensor:
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        labels = encoded.input_ids.masked_fill(encoded.attention_mask == 0, -100)
        return labels[:, 1:] if self.drop_bos else labels


# --- model and optimisation ----------------------------------------------------------------------


def build_or_load(config: TrainConfig) -> tuple[VisionEncoderDecoderModel, TrOCRProcessor]:
    """Fine-tune: load base_model. From scratch: train the tokenizer on the synthetic corpus, build the model."""
    if config.base_model is not None:
        bundle = load_trocr(config.base_model, device="cpu")
        return bundle.model, bundle.processor
    spec = config.model
    from pipeline.synth.corpus import CorpusSampler

    corpus = CorpusSampler(spec.tokenizer_corpus_seed)
    texts = [corpus.line() for _ in range(spec.tokenizer_corpus_lines)]
    tokenizer = train_tokenizer(texts, spec.tokenizer_kind, spec.vocab_size)
    return build_trocr(
        tokenizer,
        input_size=spec.input_size,
        patch_size=spec.patch_size,
        encoder=spec.encoder,
        hidden_size=spec.hidden_size,
        encoder_layers=spec.encoder_layers,
        encoder_heads=spec.encoder_heads,
        decoder_layers=spec.decoder_layers,
        decoder_heads=spec.decoder_heads,
        max_target_tokens=spec.max_target_tokens,
        keep_aspect=spec.keep_aspect,
        seed=config.seed,
    )


def learning_rate_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW without decay on biases and norms; warmup + cosine schedule."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        (no_decay if parameter.ndim < 2 else decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, config.warmup_steps, config.steps, config.min_lr_ratio)
    )
    return optimizer, schedule


def character_error_rate(references: Sequence[str], predictions: Sequence[str]) -> float:
    """Corpus CER (total edits / total reference characters), jiwer."""
    if not references:
        raise ValueError("no reference lines to compute a CER on")
    return float(jiwer.cer(list(references), list(predictions)))


# --- checkpoints ---------------------------------------------------------------------------------


@dataclass
class TrainerState:
    step: int = 0
    best_cer: float = float("inf")


def _checkpoints(work_dir: Path) -> list[Path]:
    """Checkpoint folders in step order."""
    return sorted(work_dir.glob(f"{CHECKPOINT_PREFIX}*"), key=lambda path: int(path.name.removeprefix(CHECKPOINT_PREFIX)))


def latest_checkpoint(work_dir: Path) -> Path | None:
    """The newest complete checkpoint (one interrupted while saving has no trainer state yet)."""
    complete = [path for path in _checkpoints(work_dir) if (path / TRAINER_STATE).is_file()]
    return complete[-1] if complete else None


def save_checkpoint(run: "TrainingRun", state: TrainerState) -> Path:
    """Model + processor + optimizer/scheduler/state; the trainer state file is written last (= complete)."""
    folder = run.config.work_dir / f"{CHECKPOINT_PREFIX}{state.step}"
    save_trocr(run.model, run.processor, folder)
    torch.save(
        {"step": state.step, "best_cer": state.best_cer, "optimizer": run.optimizer.state_dict(),
         "schedule": run.schedule.state_dict(), "grad_scaler": run.grad_scaler.state_dict()},
        folder / TRAINER_STATE,
    )
    for old in _checkpoints(run.config.work_dir)[: -run.config.keep_checkpoints]:
        shutil.rmtree(old)
    return folder


# --- the loop ------------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    config: TrainConfig
    model: VisionEncoderDecoderModel
    processor: TrOCRProcessor
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    autocast_dtype: torch.dtype
    forward_model: torch.nn.Module  # InkWidthForward of the model, or its DistributedDataParallel wrapper under Ray Train
    preprocessor: LinePreprocessor
    grad_scaler: torch.amp.GradScaler  # loss scaling for fp16 (V100), so small gradients do not flush to zero
    shard: tuple[int, int] = (0, 1)  # (rank, world size)

    @property
    def is_main(self) -> bool:
        return self.shard[0] == 0

    def bundle(self) -> TrOCRBundle:
        return TrOCRBundle(self.model, self.processor, self.processor.tokenizer, self.preprocessor, self.device, torch.float32,
                           self.width_step)

    @property
    def width_step(self) -> int | None:
        return ink_width_step(self.model, self.preprocessor.keep_aspect)


class InkWidthForward(torch.nn.Module):
    """The model's teacher-forced loss with each line seen as the pipeline reads it: the batch cut at its
    widest line, every line attended to over its own ink only (:func:`operators.decoding.encode_lines`),
    by the encoder and by the decoder's cross-attention. A module of its own so that DDP can wrap it.
    The loss is ``VisionEncoderDecoderModel``'s, which has no way to pass an encoder attention mask."""

    def __init__(self, model: VisionEncoderDecoderModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor,
                line_widths: Sequence[int] | None) -> torch.Tensor:
        model = self.model
        memory, own_patches = encode_lines(model.encoder, pixel_values, line_widths)
        if own_patches is None:
            return model(encoder_outputs=(memory,), labels=labels).loss
        if getattr(model, "enc_to_dec_proj", None) is not None:
            memory = model.enc_to_dec_proj(memory)
        inputs = shift_tokens_right(labels, model.config.pad_token_id, model.config.decoder_start_token_id)
        logits = model.decoder(input_ids=inputs, encoder_hidden_states=memory,
                               encoder_attention_mask=own_patches.long()).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def start_run(config: TrainConfig, resume: bool, shard: tuple[int, int] = (0, 1),
              wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> tuple[TrainingRun, TrainerState]:
    """Build (or reload) model and optimizer; with ``resume`` continue from the newest checkpoint."""
    device = resolve_device(config.device)
    autocast_dtype = resolve_dtype(config.precision, device)
    checkpoint = latest_checkpoint(config.work_dir) if resume else None
    if resume and checkpoint is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch", config.work_dir)
    if checkpoint is not None:
        bundle = load_trocr(str(checkpoint), device="cpu")
        model, processor = bundle.model, bundle.processor
    else:
        model, processor = build_or_load(config)
    model.to(device).train()
    forward_model = wrap(InkWidthForward(model)) if wrap else InkWidthForward(model)
    optimizer, schedule = make_optimizer(model, config)
    grad_scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    state = TrainerState()
    if checkpoint is not None:
        saved = torch.load(checkpoint / TRAINER_STATE, map_location=device, weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        grad_scaler.load_state_dict(saved["grad_scaler"])
        state = TrainerState(step=saved["step"], best_cer=saved["best_cer"])
        log.info("resumed from %s at step %d", checkpoint, state.step)
    preprocessor = LinePreprocessor.from_image_processor(processor.image_processor)
    run = TrainingRun(config, model, processor, optimizer, schedule, device, autocast_dtype, forward_model, preprocessor,
                      grad_scaler, shard)
    return run, state


def training_batches(run: TrainingRun, state: TrainerState) -> Iterator[Batch]:
    config = run.config
    lines_seen = state.step * config.batch_size * config.grad_accum_steps * run.shard[1]
    dataset = TrainingLines(config.train_data, run.preprocessor, config.seed, start_line=lines_seen, shard=run.shard)
    collator = LabelCollator(run.processor.tokenizer, run.model.config.decoder_start_token_id,
                             run.model.generation_config.max_new_tokens or 128)
    pools = DataLoader(dataset, batch_size=config.batch_size * WIDTH_POOL_BATCHES, collate_fn=list,
                       num_workers=config.loader_workers)
    return _width_sorted_batches(pools, collator, config.batch_size, random.Random(config.seed + lines_seen))


def _width_sorted_batches(pools: Iterable[list[tuple[np.ndarray, str]]], collator: "LabelCollator", batch_size: int,
                          rng: random.Random) -> Iterator[Batch]:
    """Batches of lines of similar ink width, so that a batch cut at its widest line spends little on
    padding: each pool of WIDTH_POOL_BATCHES batches is sorted by width, cut into batches, shuffled."""
    for pool in pools:
        pool.sort(key=lambda item: ink_columns(item[0]))
        batches = [pool[start:start + batch_size] for start in range(0, len(pool), batch_size)]
        for batch in rng.sample(batches, len(batches)):
            yield collator(batch)


def train_step(run: TrainingRun, batches: Iterator[Batch]) -> float:
    """One optimizer step over grad_accum_steps batches; returns the mean loss."""
    run.optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for _ in range(run.config.grad_accum_steps):
        batch = next(batches)
        pixel_values = run.preprocessor.to_pixel_values(batch.pixels, run.device, torch.float32, run.width_step)
        widths = [ink_columns(pixels) for pixels in batch.pixels] if run.width_step else None
        with torch.autocast(run.device.type, dtype=run.autocast_dtype, enabled=run.autocast_dtype != torch.float32):
            loss = run.forward_model(pixel_values, batch.labels.to(run.device), widths)
        run.grad_scaler.scale(loss / run.config.grad_accum_steps).backward()
        total += loss.item()
    run.grad_scaler.unscale_(run.optimizer)
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.max_grad_norm)
    run.grad_scaler.step(run.optimizer)  # skips the step when fp16 gradients overflowed
    run.grad_scaler.update()
    run.schedule.step()
    return total / run.config.grad_accum_steps


def validate(run: TrainingRun, lines: Sequence[LabeledLine]) -> float:
    """Greedy-read the validation lines as the pipeline and ``eval`` read them and return the CER."""
    from pipeline.evaluate import recognize

    run.model.eval()
    predictions = recognize(run.bundle(), lines, run.config.validation_batch_size, num_beams=1,
                            max_new_tokens=run.model.generation_config.max_new_tokens or 128)
    run.model.train()
    return character_error_rate([line.text for line in lines], predictions)


def train(config: TrainConfig, resume: bool = False, show_progress: bool = True, shard: tuple[int, int] = (0, 1),
          wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
          report: Callable[[dict], None] | None = None) -> Path:
    """Run training to ``config.steps``; returns the output folder (best validation CER, else the last model).

    Under Ray Train every worker runs this with its ``shard`` (rank, world size), ``wrap`` = prepare_model
    (DDP) and ``report`` = ray.train.report; only rank 0 validates and writes files.
    """
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    torch.manual_seed(config.seed)
    run, state = start_run(config, resume, shard, wrap)
    held_out = validation_lines(config.validation_data) if run.is_main else []
    batches = training_batches(run, state)
    last_step = min(config.steps, config.stop_after_step or config.steps)
    progress = tqdm(total=last_step, initial=state.step, disable=not (show_progress and run.is_main), desc="train", unit="step")
    recent_losses: list[float] = []
    started = time.monotonic()
    while state.step < last_step:
        loss = train_step(run, batches)
        recent_losses = (recent_losses + [loss])[-50:]
        state.step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{np.mean(recent_losses):.3f}", lr=f"{run.schedule.get_last_lr()[0]:.2e}")
        at_end = state.step == last_step
        metrics = {"step": state.step, "loss": loss, "world_size": run.shard[1]}
        if held_out and (state.step % config.validate_every == 0 or at_end):
            metrics["validation_cer"] = cer = validate(run, held_out)
            log.info("step %d: loss %.4f, validation CER %.4f (best before %.4f), %.0f s",
                     state.step, np.mean(recent_losses), cer, state.best_cer, time.monotonic() - started)
            if cer < state.best_cer:
                state.best_cer = cer
                save_trocr(run.model, run.processor, config.output_dir)
        if run.is_main and (state.step % config.checkpoint_every == 0 or at_end):
            save_checkpoint(run, state)
        if report:
            report(metrics)
    progress.close()
    if run.is_main and not config.validation_data:
        save_trocr(run.model, run.processor, config.output_dir)
    return config.output_dir


# --- Ray Train -----------------------------------------------------------------------------------


def train_with_ray(config: TrainConfig, workers: int, resume: bool = False) -> Path:
    """Data-parallel training on ``workers`` Ray Train workers (DDP over gloo on CPU, NCCL on GPU).

    Starts a private local Ray instance unless the caller already connected to one, so training
    never attaches by accident to another Ray cluster found on the machine.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = absolute_paths(config)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address="local", num_cpus=workers + 1, include_dashboard=False)
    try:
        trainer = TorchTrainer(
            _ray_worker_loop,
            train_loop_config={"config": config.model_dump(mode="json"), "resume": resume},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=resolve_device(config.device).type == "cuda"),
            run_config=RunConfig(name="trocr-train", storage_path=str(config.work_dir / "ray")),
        )
        trainer.fit()
    finally:
        if started_here:
            ray.shutdown()
    return config.output_dir


def _ray_worker_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    train(
        TrainConfig.model_validate(loop_config["config"]),
        resume=loop_config["resume"],
        show_progress=False,
        shard=(context.get_world_rank(), context.get_world_size()),
        # find_unused_parameters: the ViT pooler is part of the checkpoint but not of the loss
        wrap=lambda model: ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True}),
        report=ray.train.report,
    )


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """Ray workers do not share the driver's working directory: make every path absolute."""
    def sources(items: list[DataSource]) -> list[DataSource]:
        return [item.model_copy(update={"path": item.path.resolve() if item.path else None}) for item in items]

    return config.model_copy(update={
        "output_dir": config.output_dir.resolve(),
        "work_dir": config.work_dir.resolve(),
        "train_data": sources(config.train_data),
        "validation_data": sources(config.validation_data),
    })


# --- command line --------------------------------------------------------------------------------


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, required=True, help="training YAML (see configs/train-*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in work_dir")
    parser.add_argument("--workers", type=int, default=1, help="N > 1: data-parallel Ray Train with N CPU workers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def _interrupt_on_sigterm() -> None:
    """A killed training run unwinds like Ctrl-C, so its DataLoader worker processes exit with it."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def train_command(args: argparse.Namespace) -> int:
    config = load_train_config(args.config)
    _interrupt_on_sigterm()
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.workers > 1:
        output = train_with_ray(config, args.workers, resume=args.resume)
    else:
        output = train(config, resume=args.resume, show_progress=not args.no_progress)
    print(f"model saved to {output}")
    return ExitCode.ok
