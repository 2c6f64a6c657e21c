"""Each stage's settings: typed, frozen, unknown keys rejected.

They live beside the stages that read them; ``pipeline.config`` composes them into the job's
configuration and loads it from YAML and ``--set``.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from operators.pages import parse_pages

def _data_root() -> Path:
    """Where the bundled models and configs are: the repository, run from a clone (an editable install, the Docker
    image), else where the installed wheel put its data files (``<prefix>/share/trocr-pipeline``, pyproject.toml;
    the prefix of ``pip install --user`` or ``--prefix`` too). Failing both, the repository, which the error for a
    missing bundled model then names."""
    repository = Path(__file__).resolve().parent.parent
    if (repository / "models" / "trocr-pipeline-printed-small").is_dir():
        return repository
    try:
        files = importlib.metadata.distribution("trocr-pipeline").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    marker = next((file for file in files if file.parts[-2:] == ("configs", "local.yaml")), None)
    return Path(marker.locate()).resolve().parent.parent if marker is not None else repository


DATA_ROOT = _data_root()
#: The bundled models by their short names (``recognize.model: printed``); they take precedence over
#: a folder of the same name in the working directory.
BUNDLED_MODELS = {
    "printed": DATA_ROOT / "models" / "trocr-pipeline-printed-small",
    "handwritten": DATA_ROOT / "models" / "trocr-pipeline-handwritten-small",
}
DEFAULT_MODEL_NAME = "printed"
DEFAULT_MODEL = BUNDLED_MODELS[DEFAULT_MODEL_NAME]


def check_languages(languages: tuple[str, ...]) -> None:
    """Refuse a language that wordfreq has no word list for (its codes: en, fr, de, it, es, nl, pt, ...), and
    Chinese, Japanese and Korean, whose words no space separates (word ends are what gets scored)."""
    if not languages:
        return
    import wordfreq  # here, not at the top: every page worker imports the settings, few need word lists

    available = set(wordfreq.available_languages()) - {"zh", "ja", "ko"}
    unknown = [language for language in languages if language not in available]
    if unknown:
        raise ValueError(f"no word list for language(s) {', '.join(unknown)}; available: {', '.join(sorted(available))}")


class Frozen(BaseModel):
    """Base of every settings class: immutable, and an unknown key is an error. A number given for a text (a model
    folder named ``2024``) is that text; a YAML truth value (``true``, ``yes``, ``on``) is no number."""

    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)

    @field_validator("*", mode="before")
    @classmethod
    def _truth_values_only_for_switches(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, bool) and cls.model_fields[info.field_name].annotation is not bool:
            raise ValueError(f"got {str(value).lower()} (YAML reads true/false, yes/no and on/off as truth values), "
                             "which is not a value of this key")
        return value


class RasterizeConfig(Frozen):
    dpi: int = Field(default=300, ge=50, le=1200)
    pages_per_task: int = Field(default=8, ge=1, description="pages rendered per poppler call")
    pdfinfo_timeout_s: float = Field(default=30.0, gt=0)
    render_timeout_s: float = Field(default=120.0, gt=0, description="per page range")
    max_page_pixels: int = Field(default=250_000_000, ge=1, description="checked before rendering")
    num_cpus: float = Field(default=1.0, gt=0)
    pages: str | None = Field(default=None, description="1-based page ranges of every input, e.g. 1-3,7")
    detect_orientation: bool = Field(default=True, description="turn pages found sideways or upside down "
                                                               "(after EXIF and /Rotate) upright")
    min_file_age_s: float = Field(default=0.0, ge=0, description="leave local files modified less than this many "
                                  "seconds ago for a later run (a hot folder's files still being written)")

    @field_validator("pages", mode="before")
    @classmethod
    def _pages_as_text(cls, value: object) -> object:
        """``--set rasterize.pages=2`` and ``pages: 7`` in YAML arrive as numbers, and ``pages: [1, 3]`` as a list
        (which had been refused as "Input should be a valid string")."""
        if isinstance(value, list):
            return ",".join(str(part) for part in value)
        return str(value) if isinstance(value, int) else value

    @field_validator("pages")
    @classmethod
    def _check_pages(cls, pages: str | None) -> str | None:
        if pages is not None:
            parse_pages(pages)
        return pages


class DetectConfig(Frozen):
    """Classical line detection (operators.detect). Pixel values are at 300 dpi and scaled with
    the page dpi; lengths without a unit are in line pitches, measured on each page."""

    min_line_height_px: int = Field(default=8, ge=1, description="at 300 dpi; smaller ink is noise")
    max_skew_deg: float = Field(default=5.0, ge=0, le=45)
    sauvola_window_px: int = Field(default=75, ge=3, description="binarization window at 300 dpi")
    sauvola_k: float = Field(default=0.2, gt=0, lt=1, description="higher drops fainter ink")
    min_contrast: float = Field(default=0.5, ge=0, lt=1, description="share of typical ink contrast")
    column_gap: float = Field(default=0.5, gt=0, description="min gutter between columns")
    column_lines: float = Field(default=3.0, gt=0, description="min text height beside a gutter")
    narrow_gutter: float = Field(default=0.2, gt=0, description="min gutter beside tall text (marginal notes)")
    narrow_gutter_lines: float = Field(default=10.0, gt=0, description="min text height beside a narrow gutter")
    narrow_gutter_type: float = Field(default=0.85, gt=0, le=1,
                                      description="... with letters on one side at most this share of the other's")
    gutter_noise: float = Field(default=0.1, ge=0, lt=1, description="share of rows crossing a gutter")
    wide_gap: float = Field(default=2.5, gt=0, description="gap that separates even single lines")
    block_gap: float = Field(default=1.0, gt=0, description="min gap between stacked blocks")
    smooth_width: float = Field(default=0.8, gt=0, description="density smoothing along the line")
    smooth_height: float = Field(default=0.15, gt=0, description="density smoothing across lines")
    core_threshold: float = Field(default=0.3, gt=0, lt=1, description="core density, share of its p95")
    line_merge_gap: float = Field(default=1.5, ge=0, description="max word gap inside one line")
    line_reach: float = Field(default=0.8, gt=0, description="max distance of a line's ink from its core")
    min_line_ink: float = Field(default=0.03, ge=0, description="min ink area of a line, in pitch^2")
    min_line_aspect: float = Field(default=2.0, ge=0, description="min width / height of a line")
    min_line_thickness: float = Field(default=0.15, ge=0, lt=1,
                                      description="min median ink height per column, share of the glyph height")
    rule_column_share: float = Field(default=0.9, gt=0, le=1,
                                     description="a rule has ink in at least this share of its columns ...")
    rule_spread: float = Field(default=0.3, ge=0,
                               description="... and its per-column ink varies less than this, in glyph heights")
    polygon_padding: float = Field(default=0.15, ge=0, description="margin around a line's ink")
    crop_padding_px: int = Field(default=4, ge=0, description="padding around each line crop")
    num_cpus: float = Field(default=1.0, gt=0)
    memory_mb: int = Field(default=1024, ge=64, description="Ray memory request of a page task (rasterize, layout) "
                                                            "and of a document's export task")


class RecognizeConfig(Frozen):
    """TrOCR recognition in an actor pool."""

    model: str = Field(default=DEFAULT_MODEL_NAME, description="a bundled model (printed, handwritten), a local folder or a hub id")
    engine: Literal["fast", "hf"] = Field(default="fast",
                                          description="fast: this project's engine; hf: transformers generate")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "fp16", "bf16", "int8"] = Field(
        default="fp32", description="fp16/bf16 on a GPU; on the CPU, bf16: a bf16 encoder (needs AVX512-BF16 or "
                                    "AMX), int8: int8 encoder linear layers")
    num_beams: int = Field(default=1, ge=1)
    languages: tuple[str, ...] = Field(
        default=(), description="the pages' languages (wordfreq codes: en, fr, de, it, es, ...): beam search "
                                "favours their common words at word ends (operators.lexicon); needs num_beams >= 2")
    max_new_tokens: int | None = Field(default=None, ge=1, description="decode limit; default: the decoder's "
                                                                         "learned positions (128 for sinusoidal)")
    line_batch_size: int = Field(default=32, ge=1, description="line crops per model call")
    split_long_lines: bool = Field(default=True, description="cut lines wider than a keep-aspect model's input "
                                                              "at word gaps instead of shrinking them to fit")
    pages_per_batch: int = Field(default=4, ge=1, description="pages handed to an actor at once")
    concurrency: int | tuple[int, int] = Field(default=1, description="actors, or (min, max) to autoscale")
    num_gpus: float = Field(default=0.0, ge=0)
    num_cpus: float = Field(default=1.0, gt=0)
    accelerator_type: str | None = Field(default=None, description="e.g. V100: pin actors on mixed clusters")
    start_timeout_s: float = Field(default=1800, gt=0, description="on a cluster: how long a node that takes a "
                                   "recognizer actor may take to be found or added before the job fails, instead of "
                                   "waiting for ever")
    lost_timeout_s: float = Field(default=1800, gt=0, description="on a cluster: how long a job that has lost every "
                                  "node that can run a recognizer actor waits for one to come back or be added before "
                                  "it stops, its finished documents published, instead of waiting for ever")
    torch_threads: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "RecognizeConfig":
        if self.device == "cpu" and self.precision == "fp16":
            raise ValueError("precision fp16 needs device cuda (or auto on a GPU machine)")
        if self.device == "cuda" and self.precision == "int8":
            raise ValueError("precision int8 is for the CPU; use fp16 on a GPU")
        if self.languages and self.num_beams == 1:
            raise ValueError("languages rank the beams of a beam search: set num_beams (4 is a good start) as well")
        return self

    # checks of one key are its own validators: an error names the key (recognize.languages), not only its section

    @field_validator("languages")
    @classmethod
    def _languages_with_word_lists(cls, languages: tuple[str, ...]) -> tuple[str, ...]:
        check_languages(languages)
        return languages

    @field_validator("concurrency")
    @classmethod
    def _check_concurrency(cls, concurrency: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(concurrency, tuple) and not (1 <= concurrency[0] <= concurrency[1]):
            raise ValueError("(min, max) needs 1 <= min <= max")
        if isinstance(concurrency, int) and concurrency < 1:
            raise ValueError("needs at least 1 actor")
        return concurrency


#: The files a job can write beside its Parquet output (``output.exports``, ``--export``).
EXPORT_FORMATS = ("alto", "page", "hocr", "txt", "pdf", "mets")


class OutputConfig(Frozen):
    parquet_rows_per_file: int = Field(default=2000, ge=1)
    publish_every_s: float = Field(default=60.0, gt=0, description=(
        "publish finished documents at least this often, so that a run stopped or killed keeps them"))
    exports: tuple[Literal[EXPORT_FORMATS], ...] = Field(
        default=(), description="files beside the Parquet, in DIR/exports/")
    pdfa: bool = Field(default=False, description="searchable PDFs as PDF/A-2b")
    retry_failed: bool = Field(default=False, description="read again the documents the output holds as failed, "
                                                          "when this run's inputs hold their sources")

    @field_validator("exports")
    @classmethod
    def _each_format_once(cls, exports: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(exports))  # [pdf, pdf] had been recorded so in the documents rows

    @model_validator(mode="after")
    def _check_pdfa(self) -> "OutputConfig":
        if self.pdfa and "pdf" not in self.exports:
            raise ValueError("pdfa makes the searchable PDF a PDF/A: export pdf as well (--export pdf)")
        return self
