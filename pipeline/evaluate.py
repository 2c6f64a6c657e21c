"""``trocr-pipeline eval``: CER and WER (jiwer) of a model on line images or on whole pages with ground truth.

``--lines``: folders of line images with ``.gt.txt``, read by the pipeline's own recognizer code
(:meth:`operators.recognize.LineRecognizer.read_images`). ``--pages``: PAGE or ALTO files, whose images go through the
whole job (detection, reading order, recognition) and whose page text is compared with the ground
truth's lines in file order. Either way the figures are the pipeline's figures. Scores are
corpus-level (total edits / total reference characters or words) per source and overall.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import os
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from pydantic import ValidationError

from operators.errors import ConfigError, ExitCode
from operators.formats.read import check_page_image, page_image, page_xml_files, read_page_xml
from operators.model import PRECISIONS
from operators.recognize import LineRecognizer
from operators.settings import DEFAULT_MODEL_NAME, RecognizeConfig
from operators.storage import writing
from operators.text import NORMALIZATIONS, make_normalizer
from pipeline.train.config import DataSource
from pipeline.scoring import corpus_error_rates, line_cer
from pipeline.train.data import LabeledLine, read_line_sources

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LineResult:
    image: str
    source: str
    prediction: str
    reference: str
    cer: float

    @property
    def path(self) -> str:
        """The image's path (the XML file's with ``--pages``): its source is a folder, or a page's file by itself."""
        source = Path(self.source)
        return str(source / self.image if source.is_dir() else source)


@dataclass(frozen=True)
class PageTruth:
    """A PAGE/ALTO file's image and its text: the lines in reading order, one per row."""

    xml: Path
    image: Path
    source: str
    text: str


@dataclass(frozen=True)
class Score:
    source: str
    lines: int  # scored items: lines, or pages with --pages
    cer: float
    wer: float


def read_eval_lines(folders: Sequence[Path], paint_out_neighbours: bool = False) -> list[LabeledLine]:
    """All labelled lines of the folders, each folder once however often it is given (overlapping globs had scored a
    folder twice, and weighed it twice in the overall figure); a folder without any is an error, not a silent zero."""
    once: dict[Path, Path] = {}
    for folder in folders:
        once.setdefault(Path(folder).resolve(), Path(folder))
    return read_line_sources([DataSource(kind="folder", path=folder, paint_out_neighbours=paint_out_neighbours)
                              for folder in once.values()])


def read_page_truth(paths: Sequence[Path]) -> list[PageTruth]:
    """Each PAGE/ALTO file's image and text; a file with no line of text is refused, as an empty --lines folder is
    (it had scored as nan% and exit 0)."""
    pages = []
    for path in paths:
        for xml_path in page_xml_files(Path(path)):
            page = read_page_xml(xml_path)
            text = "\n".join(line.text for line in page.lines if line.text)
            if not text.strip():
                raise ConfigError(f"page {xml_path} holds no line with text to score the job's reading against")
            image = page_image(xml_path, page.image_name)
            check_page_image(xml_path, page, image, coordinates=False)  # its text is scored, not its lines' places
            pages.append(PageTruth(xml_path, image, str(path), text))
    return pages


def unscorable(what: str, reasons: Sequence[str], truth: str) -> ConfigError:
    """The refusal of images that cannot be read, all named: a score that left them out would not be the set's."""
    many = len(reasons) > 1
    return ConfigError(f"{len(reasons)} {what}{'s' if many else ''} cannot be read, so the score would leave "
                       f"{'them' if many else 'it'} out: {'; '.join(reasons)} (move each out with its {truth} to score "
                       "the rest)")


def recognize_pages(pages: Sequence[PageTruth], overrides: Sequence[str], verbose: bool = False) -> list[str]:
    """Each page's text from the whole job (local Ray, default config plus ``overrides``), written to a
    temporary folder; pages the job could not read are refused, all named, as ``--lines`` refuses images it cannot
    read (they had scored as empty text, exit 0, each logged once for its document and again for its page). An image
    with the bytes of another (the job reads them once) scores the other's text (it had scored as empty). Ray's own
    log lines stay off the console unless ``verbose``, as in ``run`` (they had reached it)."""
    import pyarrow.dataset as ds

    from pipeline.config import load_config
    from pipeline.job import run_job
    from pipeline.progress import without_ray_core_logs

    with (tempfile.TemporaryDirectory(prefix="trocr-eval-") as output,
          nullcontext() if verbose else without_ray_core_logs()):
        run_job([str(page.image.resolve()) for page in pages], output, load_config(None, list(overrides)),
                verbose=verbose)
        rows = ds.dataset(f"{output}/pages", format="parquet").to_table(
            columns=["doc_id", "source", "page", "text", "status", "error_message"]).to_pylist()
        documents = ds.dataset(f"{output}/documents", format="parquet").to_table(
            columns=["doc_id", "source", "status", "duplicate_of", "error_message"]).to_pylist()
    failed = {row["source"]: row["error_message"] for row in documents + rows
              if row["status"] == "failed" and row.get("page", 1) == 1}
    if failed:
        raise unscorable("page image", [f"{source}: {error}" for source, error in failed.items()], "PAGE/ALTO file")
    texts = {row["doc_id"]: row["text"] or "" for row in rows if row["page"] == 1}
    by_source = {row["source"]: texts.get(row["duplicate_of"] or row["doc_id"], "") for row in documents}
    return [by_source.get(str(page.image.resolve()), "") for page in pages]


def score_pages(pages: Sequence[PageTruth], predictions: Sequence[str],
                normalize: Callable[[str], str]) -> list[LineResult]:
    return [LineResult(page.xml.name, page.source, prediction, page.text, line_cer(normalize(page.text), normalize(prediction)))
            for page, prediction in zip(pages, predictions, strict=True)]


def score_lines(lines: Sequence[LabeledLine], predictions: Sequence[str],
                normalize: Callable[[str], str]) -> list[LineResult]:
    results = []
    for line, prediction in zip(lines, predictions, strict=True):
        reference, hypothesis = normalize(line.text), normalize(prediction)
        results.append(LineResult(line.name, line.source, prediction, line.text, line_cer(reference, hypothesis)))
    return results


def summarize(results: Sequence[LineResult], normalize: Callable[[str], str], source: str) -> Score:
    return Score(source, *corpus_error_rates([result.reference for result in results],
                                             [result.prediction for result in results], normalize))


def scores_by_source(results: Sequence[LineResult], normalize: Callable[[str], str]) -> list[Score]:
    """One score per source folder (in first-seen order), then the overall score."""
    sources = list(dict.fromkeys(result.source for result in results))
    per_source = [summarize([r for r in results if r.source == source], normalize, source) for source in sources]
    return per_source + [summarize(results, normalize, "overall")]


def format_report(scores: Sequence[Score], results: Sequence[LineResult], worst: int, unit: str = "lines") -> str:
    width = max(len(score.source) for score in scores)
    rows = [f"{'source':<{width}}  {unit:>6}  {'CER':>7}  {'WER':>7}"]
    rows += [f"{s.source:<{width}}  {s.lines:>6}  {s.cer:>7.2%}  {s.wer:>7.2%}" for s in scores]
    if worst > 0:
        rows.append(f"\nworst {min(worst, len(results))} {unit} (CER, image, reference | prediction):")
        for result in sorted(results, key=lambda r: r.cer, reverse=True)[:worst]:
            # with its folder: every synthetic set names its lines alike (line_000000.png)
            rows.append(f"{result.cer:7.2%}  {result.path}\n"
                        f"         ref:  {result.reference}\n         pred: {result.prediction}")
    return "\n".join(rows)


@contextmanager
def open_predictions(path: Path) -> Iterator[IO[str]]:
    """The ``--predictions`` file, opened before the evaluation (a path that cannot be written had been found
    only after all of it, with a traceback) but emptied only by :func:`write_predictions`: an evaluation that fails
    or is stopped leaves the file as it was (an earlier evaluation's predictions had been lost), and makes none."""
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        out = path.open("a", encoding="utf-8")
    except (FileExistsError, NotADirectoryError) as exc:  # a file where a folder of the path should be
        in_the_way = next(parent for parent in path.parents if parent.exists())
        raise ConfigError(f"cannot write --predictions {path}: {in_the_way} is not a folder") from exc
    except OSError as exc:
        raise ConfigError(f"cannot write --predictions {path}: {exc.strerror or exc}") from exc
    with out:
        try:
            yield out
        except BaseException:
            if not existed:
                path.unlink(missing_ok=True)
            raise


def write_predictions(out: IO[str], results: Sequence[LineResult]) -> None:
    """JSONL, one {image, prediction, reference, cer} object per line (per page with ``--pages``: its XML file),
    in place of what ``out`` held (a pipe, ``/dev/null`` or another device is written as it is: it cannot be emptied,
    and had failed the evaluation after all its work)."""
    try:
        emptied = stat.S_ISREG(os.fstat(out.fileno()).st_mode)
    except io.UnsupportedOperation:  # a stream in memory (emptied), or one only written to, as a console's is
        emptied = out.seekable()
    if emptied:
        out.seek(0)
        out.truncate()
    for result in results:
        row = {key: value for key, value in asdict(result).items() if key != "source"}
        row["image"] = result.path
        out.write(json.dumps(row, ensure_ascii=False) + "\n")


def evaluate(model: str, folders: Sequence[Path], normalize_options: Sequence[str] = (), batch_size: int = 32,
             num_beams: int = 1, max_new_tokens: int | None = None, device: str = "auto",
             precision: str = "fp32", languages: Sequence[str] = (),
             paint_out_neighbours: bool = False,
             on_batch: Callable[[int, int], None] | None = None,
             engine: str = "fast") -> tuple[list[Score], list[LineResult]]:
    """Load ``model``, read every folder's lines, decode and score them (``paint_out_neighbours``: see
    :meth:`pipeline.train.data.LabeledLine.load_gray`; ``on_batch``: see :meth:`LineRecognizer.__call__`;
    ``engine``: ``recognize.engine``)."""
    normalize = make_normalizer(normalize_options)
    lines = read_eval_lines(folders, paint_out_neighbours)
    images, unreadable = [], []
    for line in lines:  # all that cannot be read named at once (the first alone, then three, had been)
        try:
            images.append(line.load_gray())
        except ConfigError as exc:
            unreadable.append(str(exc))
    if unreadable:
        raise unscorable("line image", unreadable, ".gt.txt")
    recognizer = LineRecognizer.from_pretrained(model, device, precision, engine, num_beams=num_beams,
                                                max_new_tokens=max_new_tokens, line_batch_size=batch_size,
                                                languages=languages)
    readings = recognizer.read_images(images, on_batch)
    # counted as read: a long line read in pieces (a keep-aspect model's) is not cut at a reference's token count
    if truncated := sum(reading.truncated for reading in readings):
        log.warning("%d readings stopped at the %d tokens the model can write (--max-new-tokens) before the end of "
                    "their line: their CER cannot reach 0", truncated, recognizer.max_new_tokens)
    predictions = [reading.text for reading in readings]
    results = score_lines(lines, predictions, normalize)
    return scores_by_source(results, normalize), results


def evaluate_pages(model: str, paths: Sequence[Path], normalize_options: Sequence[str] = (), batch_size: int = 32,
                   num_beams: int = 1, max_new_tokens: int | None = None, device: str = "auto",
                   precision: str = "fp32", languages: Sequence[str] = (),
                   verbose: bool = False, engine: str = "fast") -> tuple[list[Score], list[LineResult]]:
    """Run the whole job on the PAGE/ALTO files' images and score each page's text (``verbose``: Ray's own output
    too)."""
    normalize = make_normalizer(normalize_options)
    pages = read_page_truth(paths)
    overrides = [f"recognize.model={model}", f"recognize.line_batch_size={batch_size}", f"recognize.num_beams={num_beams}",
                 f"recognize.max_new_tokens={'null' if max_new_tokens is None else max_new_tokens}",
                 f"recognize.device={device}", f"recognize.precision={precision}",
                 f"recognize.languages=[{','.join(languages)}]", f"recognize.engine={engine}"]
    results = score_pages(pages, recognize_pages(pages, overrides, verbose), normalize)
    return scores_by_source(results, normalize), results


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=DEFAULT_MODEL_NAME, help="bundled model (printed, handwritten), folder or hub id")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--lines", nargs="+", type=Path, help="folders of line images with <name>.gt.txt ground truth")
    data.add_argument("--pages", nargs="+", type=Path,
                      help="PAGE/ALTO files or folders of them: their images go through the whole job")
    parser.add_argument("--normalize", default="", help=f"comma list of {','.join(NORMALIZATIONS)}")
    parser.add_argument("--predictions", type=Path, help="write JSONL {image, prediction, reference, cer}")
    parser.add_argument("--worst", type=int, default=10, help="list the K lines with the highest CER")
    parser.add_argument("--batch-size", type=int, default=32, help="lines per model call")
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--languages", default="", help="comma list, e.g. fr or en,de: recognize.languages "
                                                        "(word frequencies in beam search; needs --num-beams 2 or more)")
    parser.add_argument("--max-new-tokens", type=int, help="default: what the model can produce")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--engine", default="fast", choices=("fast", "hf"),
                        help="recognize.engine: fast, this project's; hf, transformers generate (a VisionEncoderDecoder "
                             "whose decoder is not TrOCR's)")
    parser.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS),
                        help="int8: the encoder's linear layers quantized, on the CPU (recognize.precision)")
    parser.add_argument("--paint-out-neighbours", action="store_true",
                        help="--lines whose images are cut with a margin: paint out the ink of the lines above and "
                             "below first, as the job does for the lines it cuts (not for images cut tight)")
    parser.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging, and with --pages Ray's own progress output and logs")


def eval_command(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.num_beams < 1 or (args.max_new_tokens or 1) < 1 or args.worst < 0:
        raise ConfigError("--batch-size, --num-beams and --max-new-tokens must be >= 1, --worst >= 0")
    options = [option.strip() for option in args.normalize.split(",") if option.strip()]
    languages = tuple(language.strip() for language in args.languages.split(",") if language.strip())
    if languages:  # the job's own checks (languages need beams, and word lists), before any model is loaded
        try:
            RecognizeConfig(num_beams=args.num_beams, languages=languages)
        except ValidationError as exc:  # a config file's error had been given: eval reads none
            reasons = "; ".join(item["msg"].removeprefix("Value error, ") for item in exc.errors())
            raise ConfigError(f"--languages {args.languages} with --num-beams {args.num_beams}: {reasons}") from None
    if args.paint_out_neighbours and args.pages:
        raise ConfigError("--paint-out-neighbours is for --lines: the job paints out the lines it cuts itself")
    if args.pages:
        run = functools.partial(evaluate_pages, verbose=args.verbose, engine=args.engine)
    else:
        from pipeline.progress import PeriodicProgress

        run = functools.partial(evaluate, paint_out_neighbours=args.paint_out_neighbours,
                                on_batch=PeriodicProgress("reading lines"), engine=args.engine)
    with open_predictions(args.predictions) if args.predictions else nullcontext() as predictions:
        scores, results = run(args.model, args.pages or args.lines, options, args.batch_size, args.num_beams,
                              args.max_new_tokens, args.device, args.precision, languages)
        print(format_report(scores, results, args.worst, "pages" if args.pages else "lines"))
        if predictions is not None:
            with writing(f"--predictions {args.predictions}"):
                write_predictions(predictions, results)
            print(f"\npredictions written to {args.predictions}")
    return ExitCode.ok
