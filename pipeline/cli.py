"""``trocr-pipeline`` command line: run, detect, show, synth, train, eval, inspect.

Every :class:`~operators.errors.PipelineError` becomes its exit code and a one-line message; a job
whose documents partly failed exits with ``documents_failed`` after writing everything it could.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import json
import logging
import os
import signal
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

from pipeline.config import add_config_arguments, config_from_arguments
from operators.errors import ConfigError, ExitCode, OutputNotWritable, PipelineError
from operators.settings import EXPORT_FORMATS
from operators.storage import is_uri, make_local_folder, writing
from operators.text import printable_text

log = logging.getLogger("trocr_pipeline")
#: What Ray's job supervisor gives a submitted job's driver: its runtime environment (working dir) as JSON.
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def check_paths_outlive_the_job(written: Sequence[str | os.PathLike | None],
                                read: Sequence[str | os.PathLike | None] = ()) -> None:
    """Refuse relative local paths in a job submitted with a working dir (``ray job submit --working-dir``): the
    command runs in Ray's copy of that folder, which Ray deletes, and a resubmitted job gets a new one. What is
    ``written`` there is lost; documents ``read`` there are recorded under the copy's path (and had been uploaded
    with the code)."""
    job = json.loads(os.environ.get(RAY_JOB_CONFIG_ENV) or "{}")
    if not (job.get("runtime_env") or {}).get("working_dir"):
        return
    for paths, what in ((written, "written into"), (read, "read from")):
        for path in (str(path) for path in paths if path):
            if not is_uri(path) and not os.path.isabs(path):
                raise ConfigError(f"{path!r} is relative: in a job submitted with --working-dir it would be {what} "
                                  "Ray's copy of that folder, which Ray deletes; give an absolute path on storage "
                                  "every node shares, or a URI (s3://...)")


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="files, folders or globs; local paths or URIs (s3://, gs://)")
    parser.add_argument("--output", "-o", required=True, help="output folder or URI")
    add_config_arguments(parser, "recognize.precision=fp16")
    parser.add_argument("--export", metavar="FORMATS",
                        help="also write alto,page,hocr,txt,pdf,mets files to DIR/exports (same as output.exports)")
    parser.add_argument("--pdfa", action="store_true", help="searchable PDFs as PDF/A-2b (output.pdfa)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="read again the documents the output holds as failed, from these inputs "
                             "(output.retry_failed)")
    parser.add_argument("--dry-run", action="store_true",
                        help="triage only: list documents, page counts and problems; write nothing")
    parser.add_argument("--log-json", metavar="FILE",
                        help="append one JSON object per finished document to FILE (a local file, the driver's)")
    parser.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging, and Ray's own progress output and logs")


def _job_command(args: argparse.Namespace, mode: str) -> int:
    from pipeline.job import dry_run, run_job
    from pipeline.progress import JobProgress, check_log_json, without_ray_core_logs

    if not args.output.strip():
        raise ConfigError("--output is empty: give the output folder or URI")
    if args.log_json is not None:
        if is_uri(args.log_json) or not args.log_json.strip():
            # read as a path, s3://b/log had become ./s3:/b/log: written there if such a folder was there
            raise ConfigError(f"--log-json {args.log_json!r}: the log is a local file, which the driver appends to "
                              "as documents are published (under ray job submit, on the head node); give its path")
        args.log_json = Path(args.log_json)
    check_paths_outlive_the_job([args.output, args.log_json], args.inputs)
    overrides = []
    if args.export is not None:
        formats = [name.strip() for name in args.export.split(",") if name.strip()]
        if not formats:
            raise ConfigError(f"--export {args.export!r} names no format; choose from {','.join(EXPORT_FORMATS)}")
        if unknown := [name for name in formats if name not in EXPORT_FORMATS]:
            raise ConfigError(f"--export: unknown format(s) {', '.join(unknown)}; choose from {','.join(EXPORT_FORMATS)}")
        overrides.append(f"output.exports={json.dumps(formats)}")
    if args.pdfa:
        overrides.append("output.pdfa=true")
    if args.retry_failed:
        overrides.append("output.retry_failed=true")
    config = config_from_arguments(args, overrides)
    if args.dry_run:
        if args.log_json is not None:
            check_log_json(args.log_json)
        report = dry_run(args.inputs, args.output, config, mode=mode)
        print(report.describe())
        return ExitCode.documents_failed if report.failing else ExitCode.ok
    progress = JobProgress(interactive=sys.stderr.isatty(), log_json=args.log_json, loads_model=mode == "recognize")
    with nullcontext() if args.verbose else without_ray_core_logs():
        try:
            try:
                summary = run_job(args.inputs, args.output, config, mode=mode, progress=progress,
                                  verbose=args.verbose)
            finally:
                progress.close()
        except KeyboardInterrupt:  # what is safe, said: the console had been told only "interrupted"
            written = progress.documents_published
            print(f"interrupted: {written} document{'' if written == 1 else 's'} written to {args.output} by this run; "
                  "the same command again goes on with the others", file=sys.stderr)
            raise
    print(summary.describe())
    return ExitCode.documents_failed if summary.written.documents_failed or summary.failed_earlier else ExitCode.ok


def _whole_number(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``least``."""
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < least:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {least}, got {text!r}")
        return int(text)

    return parse


def _new_synth_folder(path: str) -> None:
    """Create the synth output, or take it only if it is empty: a set written into another's folder had mixed with
    it (the older set's images left beside the new manifest, and read by eval and train). Nothing there is deleted."""
    make_local_folder(path)
    try:
        held = sorted(os.listdir(path))
    except OSError as exc:
        raise OutputNotWritable(f"the output {path} cannot be read: {exc}") from exc
    if held:
        raise ConfigError(printable_text(f"synth: --output {path} already holds {len(held)} files or folders ({held[0]} "
                                         "first): choose an empty or new folder (a new set would mix with them)"))


def _synth_command(args: argparse.Namespace) -> int:
    check_paths_outlive_the_job([args.output])
    if args.what == "docs":
        from pipeline.synth.docs import write_document_set

        if args.languages is not None:
            raise ConfigError("--languages is for synth lines: synthetic documents are English")
        dpi = 150 if args.dpi is None else args.dpi
        _new_synth_folder(args.output)
        try:
            with writing(args.output):
                paths = write_document_set(Path(args.output), args.count, args.seed, dpi=dpi,
                                           font_kind=args.font_kind)
        except ValueError as exc:  # an argument out of its range (the dpi)
            raise ConfigError(f"synth docs: {exc}") from exc
        print(f"wrote {len(paths)} documents with ground truth to {args.output}")
    else:
        from pipeline.synth.corpus import LANGUAGES, check_languages
        from pipeline.synth.lines import write_line_set

        if args.dpi is not None:  # it had been taken and had done nothing
            raise ConfigError("--dpi is for synth docs: synthetic lines are drawn at their font's size")

        named = [part.strip() for part in ("en" if args.languages is None else args.languages).split(",") if part.strip()]
        if not named:  # it had been taken as the default, English
            raise ConfigError(f"--languages {args.languages!r} names no language; choose from {','.join(LANGUAGES)}")
        try:
            languages = check_languages(named)
        except ValueError as exc:
            raise ConfigError(f"--languages: {exc}") from exc
        _new_synth_folder(args.output)
        with writing(args.output):
            folder = write_line_set(Path(args.output), args.count, args.seed, font_kind=args.font_kind,
                                    languages=languages)
        print(f"wrote {args.count} line images with ground truth to {folder}")
    return ExitCode.ok


def _show_command(args: argparse.Namespace) -> int:
    from operators.checkpoint import model_named
    from operators.pages import selected_pages
    from operators.write import read_published

    if not args.output.strip():
        raise ConfigError("show: the output name is empty: give the output folder or URI")
    documents, pages = read_published(args.output, ["source", "page", "status", "error_code", "error_message",
                                                     "text", "lines"], first_pages=0 if args.failed else args.pages)
    if not documents:
        print(f"{args.output} holds no document yet")
    sources = {document["doc_id"]: document["source"] for document in documents if document["status"] != "duplicate"}
    readings = Counter(document["source"] for document in documents if document["status"] == "ok")
    # --failed: where a run names its first failures only, the rest among thousands of documents
    listed = [document for document in documents if not args.failed or document["status"] == "failed"]
    for document in sorted(listed, key=lambda row: row["source"]):
        reason = (f" ({document['error_code']}: {document['error_message']})" if document["status"] == "failed"
                  else f" (same bytes as {sources.get(document['duplicate_of'], 'another document')})"
                  if document["status"] == "duplicate"
                  else _which_reading(document, readings[document["source"]]))
        # the pages read where --pages left some out: "2 pages" had been shown for a document read on its first only
        read = len(selected_pages(document.get("pages_selected"), document["num_pages"]))
        # a failed one's too ("3 pages" had been shown for a document failed on one of the 2 pages read)
        count = (f"{document['num_pages']:4} pages" if read == document["num_pages"]
                 else f"{read:4} of {document['num_pages']} pages")
        # a name may hold a newline (Linux allows it): one line per document all the same
        print(printable_text(f"{document['status']:9} {count}  {document['source']}{reason}"))
    if documents:
        statuses = Counter(document["status"] for document in documents)
        print(f"documents: {statuses['ok']} ok, {statuses['failed']} failed, {statuses['duplicate']} duplicates")
    # which model read them: an output written by several (another version of a bundled one) says so
    for (model, weights), count in sorted(Counter((document.get("model"), document.get("model_sha256"))
                                                  for document in documents if document.get("model")).items()):
        print(printable_text(f"read by {model_named(model, weights)}: {count} document{'s' if count != 1 else ''}"))
    names = Counter(Path(document["source"]).name for document in documents)
    for page in pages:
        # a page is headed by its file's name, or by its whole source where another document has that name
        heading = Path(page["source"]).name if names[Path(page["source"]).name] == 1 else page["source"]
        confidences = [line["confidence"] for line in page["lines"] if line["confidence"] is not None]
        # a read page without lines had been said to be "not recognized", as a detect run's are; a failed page was
        # not read, so nothing was found on it either
        if page["status"] == "failed":
            mean = f"failed ({page['error_code']}: {page['error_message']})"
        else:
            mean = (f"mean confidence {sum(confidences) / len(confidences):.2f}" if confidences
                    else "no text found" if not page["lines"] else "not recognized")
        print(f"\n--- {printable_text(heading)} page {page['page']}: {len(page['lines'])} lines, "
              f"{printable_text(mean)}")
        if page["text"]:  # a detect output's pages had each been followed by an empty line
            print("\n".join(page["text"].splitlines()[: args.lines]))
    return ExitCode.ok


def _which_reading(document: dict, readings: int) -> str:
    """What tells apart the readings of a file read again with other bytes (a scan replaced under its name), each a
    document of its own: the file's size and modification time now (show had printed two identical lines)."""
    if readings < 2:
        return ""
    from operators.ingest import source_stamp

    try:
        now = None if is_uri(document["source"]) else source_stamp(document["source"])
    except PipelineError:
        now = None
    read = (document.get("source_size"), document.get("source_mtime_ns"))
    if now is None or None in read:  # the file not here to look at, or the row older than its size and time
        return f" (one of {readings} readings of this file, of different bytes)"
    return " (the file has changed since this reading)" if read != now else ""


#: Commands whose modules load torch and transformers (seconds): name -> (module, its argument adder,
#: its handler, help). Only the command being run imports its module, so ``run`` starts without them.
MODEL_COMMANDS = {
    "train": ("pipeline.train.cli", "add_train_arguments", "train_command", "fine-tune or train a TrOCR model"),
    "eval": ("pipeline.evaluate", "add_eval_arguments", "eval_command",
             "CER/WER of a model on line images with ground truth"),
    "inspect": ("pipeline.inspect", "add_inspect_arguments", "inspect_command",
                "PNG overlays of the detected lines (and their text) per page"),
}


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The full parser for the command named in ``argv``; the other model commands are listed by name."""
    parser = argparse.ArgumentParser(prog="trocr-pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging (also after the command)")
    commands = parser.add_subparsers(dest="command", required=True)

    # each command's help is also the description its own --help opens with (detect's had read as run's)
    run_help = "the whole job: ingest, rasterize, detect, recognize, write Parquet"
    run = commands.add_parser("run", help=run_help, description=run_help)
    _add_job_arguments(run)
    run.set_defaults(handler=lambda args: _job_command(args, "recognize"))

    detect_help = "layout only: the pages table with empty line texts"
    detect = commands.add_parser("detect", help=detect_help, description=(
        f"{detect_help}; no model is loaded and recognize.* settings are not used"))
    _add_job_arguments(detect)
    detect.set_defaults(handler=lambda args: _job_command(args, "detect"))

    synth_help = "synthetic scanned documents or text lines with ground truth"
    synth = commands.add_parser("synth", help=synth_help, description=synth_help)
    synth.add_argument("what", choices=["docs", "lines"])
    synth.add_argument("--output", "-o", required=True)
    synth.add_argument("--count", "-n", type=_whole_number(1), default=4)
    synth.add_argument("--seed", type=_whole_number(0), default=0)
    synth.add_argument("--dpi", type=int, help="docs only (default 150)")
    synth.add_argument("--font-kind", choices=["printed", "handwritten", "historical", "all", "heldout"], default="printed",
                       help="heldout: printed fonts no model is trained on, for measuring (bench/heldout_fonts.py)")
    synth.add_argument("--languages", help="lines only: comma-separated, some of en,fr,de,it,es,la (default en); "
                                           "each line is in one of them, picked by its seed")
    synth.set_defaults(handler=_synth_command)

    show_help = "print the documents of an output and the start of its first pages' text"
    show = commands.add_parser("show", help=show_help, description=show_help)
    show.add_argument("output")
    show.add_argument("--pages", type=_whole_number(0), default=3,
                      help="pages to print in all, the first by source and page number")
    show.add_argument("--lines", type=_whole_number(0), default=8, help="lines per page to print")
    show.add_argument("--failed", action="store_true", help="the failed documents only, with their errors, no text")
    show.set_defaults(handler=_show_command)

    named = next((argument for argument in argv if not argument.startswith("-")), None)
    for name, (module_name, add_arguments, handler, help_text) in MODEL_COMMANDS.items():
        command = commands.add_parser(name, help=help_text, description=help_text)
        if name == named:
            module = importlib.import_module(module_name)
            getattr(module, add_arguments)(command)
            command.set_defaults(handler=getattr(module, handler))
    return parser


def _interrupt_on_sigterm() -> None:
    """SIGTERM (``kill``, systemd, ``ray job stop``) stops a command as Ctrl-C does: a job publishes what it
    finished, training's DataLoader workers exit with it, and the console gets one line and exit code 130."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def _no_colour_reset_at_exit() -> None:
    """Ray's bundled colorama, set up when Ray starts, writes a colour reset (``\\x1b[0m``) to a terminal's
    standard output at exit, a stray line after the summary; nothing here sets a colour."""
    colorama = sys.modules.get("colorama.initialise")
    if colorama is not None:
        atexit.unregister(colorama.reset_all)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    # this project's messages from INFO; other libraries' (fontTools reports every font it subsets) only
    # from WARNING, unless --verbose
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        for name in ("operators", "pipeline", log.name):
            logging.getLogger(name).setLevel(logging.INFO)
    _interrupt_on_sigterm()
    try:
        return int(args.handler(args))
    except PipelineError as error:
        print(f"trocr-pipeline: error: {error}", file=sys.stderr)
        return int(error.exit_code)
    except KeyboardInterrupt:
        print("trocr-pipeline: interrupted", file=sys.stderr)
        return int(ExitCode.ctrl_c)
    finally:
        _no_colour_reset_at_exit()


def entry() -> None:
    """The command as a process: :func:`main`, then an exit whose garbage collections leave out every object then
    alive (``gc.freeze``); the interpreter's collections at exit had taken 1.2 s after a job, with torch loaded."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
