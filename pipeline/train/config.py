"""The training configuration: typed and frozen like the job's, read from one YAML file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args, get_origin

import yaml
from pydantic import Field, ValidationError, model_validator
from pydantic_core import PydanticUndefined

from operators.errors import ConfigError
from operators.settings import Frozen
from pipeline.config import config_file, describe_errors, read_yaml
from pipeline.synth.corpus import Language, check_languages

#: Defined here, not beside the code that builds them: reading a training config (``bench/gpu_pack.py``)
#: then never loads transformers.
EncoderKind = Literal["vit", "deit"]
TokenizerKind = Literal["roberta", "xlm-roberta"]


class ModelSpec(Frozen):
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

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        """Checked here, when the config is read: a wrong shape had failed in a traceback only after the tokenizer
        was trained, or (encoder heads that do not divide hidden_size) built a narrower attention than asked."""
        if min(self.input_size + self.patch_size) < 1:
            raise ValueError(f"input_size {list(self.input_size)} and patch_size {list(self.patch_size)} must be "
                             "positive")
        if self.input_size[0] % self.patch_size[0] or self.input_size[1] % self.patch_size[1]:
            raise ValueError(f"input_size {list(self.input_size)} is not a multiple of patch_size "
                             f"{list(self.patch_size)} (height of height, width of width)")
        for heads in ("encoder_heads", "decoder_heads"):
            if self.hidden_size % getattr(self, heads):
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of {heads} {getattr(self, heads)}")
        return self


class LayerSelection(Frozen):
    """Layers of the base model, by index and in order, that make a smaller model to fine-tune: fewer
    layers cost less per line, and a student started from the base's own layers learns far faster than
    one started from random weights."""

    encoder: tuple[int, ...] = Field(min_length=1)
    decoder: tuple[int, ...] = Field(min_length=1)


class DataSource(Frozen):
    """Labelled lines: a folder of image + .gt.txt, PAGE/ALTO pages, or streamed synthetic lines."""

    kind: Literal["folder", "pages", "synth"]
    path: Path | None = Field(default=None, description="folder or pages: where the files are")
    font_kind: Literal["printed", "handwritten", "historical", "all"] = "printed"
    languages: tuple[Language, ...] = Field(default=("en",), min_length=1,
                                            description="synth: languages of the text, each line in one of them")
    seed: int = Field(default=0, description="synth: the line set; different seeds give disjoint sets")
    count: int | None = Field(default=None, ge=1, description="synth: lines (validation needs it); None = endless")
    augment: bool = Field(default=False, description="folder or pages: vary each real line every time it is drawn")
    paint_out_neighbours: bool = Field(default=False, description=(
        "folder: its images are cut with a margin and hold ink of the lines above and below, which is painted "
        "out as the pipeline does for the lines it cuts (not for images cut tight: their own accents touch the edge)"))
    weight: float = Field(default=1.0, gt=0, description="share of training batches drawn from this source")

    @model_validator(mode="after")
    def _check(self) -> "DataSource":
        if self.kind != "synth" and self.path is None:
            raise ValueError(f"data source kind {self.kind!r} needs a path")
        check_languages(self.languages)
        return self


class TrainConfig(Frozen):
    output_dir: Path = Field(description="best model so far, as a save_pretrained folder")
    replace_output: bool = Field(default=False, description=(
        "a new run may replace a model output_dir holds already (a bundled model retrained); its card goes with it"))
    work_dir: Path = Field(description="checkpoints with optimizer state, for --resume")
    base_model: str | None = Field(default=None, description="checkpoint to fine-tune (hub id or folder)")
    model: ModelSpec | None = Field(default=None, description="or: build this model from scratch")
    base_layers: LayerSelection | None = Field(default=None, description=(
        "fine-tune a smaller model made of these encoder and decoder layers of base_model; None keeps them all"))
    width_scale: float | None = Field(default=None, gt=0, description=(
        "keep-aspect models: stretch every line this much wider before fitting it to the input, saved "
        "with the model so that the pipeline reads lines as it was trained on them; None keeps the base's"))
    train_data: list[DataSource] = Field(min_length=1, description="the labelled lines to learn from (below)")
    validation_data: list[DataSource] = Field(default=[], description=(
        "lines whose CER is measured every validate_every steps: output_dir gets the best model; none: the last"))
    steps: int = Field(ge=1, description="optimizer steps; the learning-rate schedule spans them")
    stop_after_step: int | None = Field(default=None, ge=1,
                                        description="end this run early, at this step, on the same schedule")
    batch_size: int = Field(default=32, ge=1, description="lines per batch; a step takes grad_accum_steps of them")
    grad_accum_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=5e-4, gt=0)
    warmup_steps: int = Field(default=200, ge=0)
    min_lr_ratio: float = Field(default=0.05, ge=0, le=1, description="cosine decay ends at lr * this")
    weight_decay: float = Field(default=0.01, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        default="fp32", description="autocast: fp16 on CUDA; bf16 on CUDA or a CPU with native bf16 (AMX, AVX512-BF16)")
    checkpoint_every: int = Field(default=500, ge=1, description="steps between checkpoints in work_dir")
    keep_checkpoints: int = Field(default=2, ge=1, description="the newest checkpoints kept")
    validate_every: int = Field(default=500, ge=1)
    validation_batch_size: int = Field(default=64, ge=1)
    torch_threads: int | None = Field(default=None, ge=1, description="CPU threads; None: torch's own choice")
    loader_workers: int = Field(default=0, ge=0, description="DataLoader processes making training lines")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if (self.base_model is None) == (self.model is None):
            raise ValueError("give exactly one of base_model (fine-tune) or model (build from scratch)")
        if self.base_layers is not None and self.base_model is None:
            raise ValueError("base_layers selects layers of base_model: give base_model")
        if any(source.kind == "synth" and source.count is None for source in self.validation_data):
            raise ValueError("synthetic validation data needs a count")
        return self

    @property
    def last_step(self) -> int:
        """The step this run ends at: ``stop_after_step`` when set (the schedule stays that of ``steps``)."""
        return min(self.steps, self.stop_after_step or self.steps)

    def is_validation_step(self, step: int) -> bool:
        """Rank 0 validates on these steps, and under Ray Train every rank reports its metrics."""
        return step % self.validate_every == 0 or step == self.last_step


def load_train_config(path: Path) -> TrainConfig:
    path = config_file(path)
    try:
        tree = read_yaml(path.read_text(), str(path))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read training config {path}: {exc}") from exc
    try:
        return TrainConfig.model_validate(tree or {})
    except ValidationError as exc:
        raise ConfigError(f"invalid training config {path}: {describe_errors(exc)}") from exc


def config_reference() -> str:
    """Every key of a training config, from the models' own fields (``train --help``): the YAML had been described
    nowhere but in this module."""
    sections = [(TrainConfig, "the training config (YAML)"), (DataSource, "each item of train_data and validation_data"),
                (ModelSpec, "model (a model built from scratch)"), (LayerSelection, "base_layers")]
    lines = []
    for model, title in sections:
        lines.append(f"{title}:")
        for name, field in model.model_fields.items():
            default = ("required" if field.is_required() else
                       f"default {field.default!r}" if field.default is not PydanticUndefined else "default []")
            lines.append(f"  {name}: {_kind(field.annotation)}, {default}"
                         + (f": {field.description}" if field.description else ""))
        lines.append("")
    return "\n".join(lines)


def _kind(annotation: object) -> str:
    """``int``, ``'cpu' | 'cuda'``, ``list[DataSource]``: a type as the YAML's writer reads it."""
    if isinstance(annotation, type):
        return annotation.__name__
    if get_origin(annotation) is Literal:
        return " | ".join(repr(value) for value in get_args(annotation))
    return str(annotation).replace("typing.", "").replace("pathlib.", "").replace(f"{__name__}.", "")
