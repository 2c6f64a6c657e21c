"""trocr-pipeline eval: scoring with jiwer, normalisation, per-source report, predictions file."""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import re
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
from PIL import Image, ImageDraw, ImageFont

from operators.errors import ConfigError, ExitCode
from pipeline.cli import build_parser
from pipeline.evaluate import (
    LineResult,
    PageTruth,
    eval_command,
    evaluate,
    format_report,
    score_pages,
    scores_by_source,
)
from helpers import build_tiny_random_trocr
from operators.text import make_normalizer
from pipeline.scoring import line_cer
from pipeline.stderr_filter import ray_line_start
from pipeline.synth.docs import load_ground_truth, write_document_set

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def write_lines(folder: Path, texts: list[str]) -> Path:
    folder.mkdir(parents=True)
    font = ImageFont.truetype(FONT, size=20)
    for index, text in enumerate(texts):
        image = Image.new("L", (int(font.getlength(text)) + 10, 32), 255)
        ImageDraw.Draw(image).text((5, 5), text, font=font, fill=0)
        image.save(folder / f"l{index}.png")
        (folder / f"l{index}.gt.txt").write_text(text, encoding="utf-8")
    return folder


def parse(argv: list[str]) -> argparse.Namespace:
    """``trocr-pipeline eval ARGV`` as the command line parses it."""
    return build_parser(["eval"]).parse_args(["eval", *argv])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_random_trocr(tmp_path_factory.mktemp("model"))


def test_eval_command_reports_each_folder_and_writes_predictions(tmp_path, tiny_model, capsys):
    first = write_lines(tmp_path / "first", ["alpha beta", "gamma"])
    second = write_lines(tmp_path / "second", ["delta"])
    predictions = tmp_path / "out" / "predictions.jsonl"
    args = parse(["--model", str(tiny_model), "--lines", str(first), str(second), "--predictions", str(predictions),
                  "--worst", "2", "--batch-size", "2", "--max-new-tokens", "8", "--device", "cpu"])
    assert eval_command(args) == ExitCode.ok
    report, console = capsys.readouterr()
    assert "progress:" not in console  # a short evaluation says nothing while it reads
    assert str(first) in report and str(second) in report and "overall" in report
    assert "worst 2 lines" in report
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 3
    assert set(rows[0]) == {"image", "prediction", "reference", "cer"}
    assert {row["reference"] for row in rows} == {"alpha beta", "gamma", "delta"}
    assert rows[0]["image"].endswith("first/l0.png")
    # the job's CPU precisions, int8 included (eval had refused it, so its accuracy could not be measured)
    assert eval_command(parse(["--model", str(tiny_model), "--lines", str(first), "--max-new-tokens", "8",
                               "--device", "cpu", "--precision", "int8"])) == ExitCode.ok
    assert "overall" in capsys.readouterr().out
    # a --predictions path that cannot be written is found before the model is loaded (a traceback after all the
    # work, before), and a file in the way of its folder is named (it had said "File exists"); a file that is no PAGE
    # or ALTO is named in one line (an lxml traceback)
    (tmp_path / "a-file").write_text("in the way")
    for predictions in (tmp_path / "a-file" / "p.jsonl", tmp_path / "a-file" / "sub" / "p.jsonl"):
        with pytest.raises(ConfigError) as refused:
            eval_command(parse(["--model", str(tmp_path / "no-model"), "--lines", str(first), "--predictions",
                                str(predictions)]))
        assert str(refused.value) == f"cannot write --predictions {predictions}: {tmp_path / 'a-file'} is not a folder"
    with pytest.raises(ConfigError, match=f"{tmp_path / 'a-file'} is no PAGE or ALTO file"):
        eval_command(parse(["--model", str(tiny_model), "--pages", str(tmp_path / "a-file"), "--device", "cpu"]))
    with pytest.raises(ConfigError, match=f"^page source {tmp_path / 'nothing.xml'} does not exist$"):  # "no .xml found"
        eval_command(parse(["--model", str(tiny_model), "--pages", str(tmp_path / "nothing.xml"), "--device", "cpu"]))


def test_a_line_evaluation_says_how_far_it_is_as_it_reads(tmp_path, tiny_model):
    """eval --lines had said nothing until its report, minutes for thousands of lines on a CPU."""
    from pipeline.progress import PeriodicProgress

    lines = write_lines(tmp_path / "lines", ["alpha", "beta", "gamma", "delta"])
    console = io.StringIO()
    evaluate(str(tiny_model), [lines], batch_size=1, max_new_tokens=8, device="cpu",
             on_batch=PeriodicProgress("reading lines", stream=console, interval_s=0))
    shown = console.getvalue().splitlines()
    assert [line.split()[3] for line in shown] == ["25%", "50%", "75%"], shown
    assert all(re.fullmatch(r"progress: reading lines \d+% done, 0:\d\d elapsed, ETA 0:\d\d", line) for line in shown), shown


def test_eval_notes_readings_stopped_at_the_tokens_the_model_can_write(tmp_path, tiny_model, caplog):
    """train warns of transcriptions longer than a label; eval had said nothing of readings cut at the tokens the
    model can write, whose score that length caps (counted as read: a long line read in pieces is not cut)."""
    lines = write_lines(tmp_path / "lines", ["the", "the quick brown fox jumps", "over the lazy dog"])
    with caplog.at_level(logging.WARNING, logger="pipeline.evaluate"):
        evaluate(str(tiny_model), [lines], max_new_tokens=4, device="cpu")
    assert re.search(r"[1-3] readings stopped at the 4 tokens the model can write \(--max-new-tokens\) before the "
                     r"end of their line: their CER cannot reach 0", caplog.text), caplog.text


def test_eval_languages_read_with_word_scores_and_need_beams(tmp_path, tiny_model, capsys):
    lines = write_lines(tmp_path / "lines", ["alpha beta"])
    common = ["--model", str(tiny_model), "--lines", str(lines), "--device", "cpu", "--max-new-tokens", "8"]
    assert eval_command(parse([*common, "--num-beams", "2", "--languages", "en, fr"])) == ExitCode.ok
    assert "overall" in capsys.readouterr().out
    # named by eval's own options: the message had been of a config file (local.yaml) eval never reads
    with pytest.raises(ConfigError, match="^--languages en with --num-beams 1: languages rank the beams .*set num_beams"):
        eval_command(parse([*common, "--languages", "en"]))
    with pytest.raises(ConfigError, match="^--languages tlh with --num-beams 2: no word list for language"):
        eval_command(parse([*common, "--num-beams", "2", "--languages", "tlh"]))
    # past the command's own check, the evaluation hands the languages on to the recognizer it builds
    with pytest.raises(ValueError, match="no word list for language"):
        evaluate(str(tiny_model), [lines], num_beams=2, device="cpu", languages=("tlh",))


def test_folder_without_labelled_lines_is_an_error(tmp_path, tiny_model):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no labelled lines"):
        eval_command(parse(["--model", str(tiny_model), "--lines", str(tmp_path / "empty"), "--device", "cpu"]))
    # a folder of line folders: they are named (it had been refused with no word of them)
    write_lines(tmp_path / "sets" / "first", ["alpha"])
    write_lines(tmp_path / "sets" / "second", ["beta"])
    with pytest.raises(ConfigError, match=r"its subfolders first, second hold lines: give them \(subfolders are not "):
        eval_command(parse(["--model", str(tiny_model), "--lines", str(tmp_path / "sets"), "--device", "cpu"]))


def test_eval_lines_names_every_image_it_cannot_read_and_what_a_line_folder_holds(tmp_path):
    """Of five images it could not read eval had named three, then "...", where the README says all are named; a
    folder without lines was said to want .png|jpg|tif, or PAGE/ALTO pages, which --lines never reads."""
    lines = write_lines(tmp_path / "lines", ["alpha"] * 6)
    for index in range(1, 6):
        (lines / f"l{index}.png").write_bytes(b"no image")
    with pytest.raises(ConfigError) as refused:
        eval_command(parse(["--model", str(tmp_path / "no-model"), "--lines", str(lines), "--device", "cpu"]))
    assert str(refused.value).startswith("5 line images cannot be read, so the score would leave them out: ")
    assert all(f"line image {lines / f'l{index}.png'} cannot be read" in str(refused.value) for index in range(1, 6))
    assert "..." not in str(refused.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as refused:
        eval_command(parse(["--model", str(tmp_path / "no-model"), "--lines", str(tmp_path / "empty")]))
    assert str(refused.value) == (f"folder source {tmp_path / 'empty'} holds no labelled lines "
                                  "(<name>.tif|tiff|png|jpg|jpeg|jp2|j2k|jpx|jpf|bmp|webp|gif beside <name>.gt.txt)")


def test_a_folder_given_twice_is_read_once_and_the_worst_lines_are_named_with_their_folder(tmp_path, tiny_model,
                                                                                           capsys):
    """Overlapping globs had scored a folder twice (and weighed it twice overall); every synthetic set names its
    lines alike, and the worst lines had been listed by file name alone."""
    folder = write_lines(tmp_path / "set", ["alpha beta"])
    argv = ["--model", str(tiny_model), "--lines", str(folder), f"{folder}/", "--device", "cpu", "--max-new-tokens", "4",
            "--worst", "1"]
    assert eval_command(parse(argv)) == ExitCode.ok
    report = capsys.readouterr().out
    assert re.search(r"^overall\s+1\s", report, re.MULTILINE), report
    assert f"  {folder / 'l0.png'}\n" in report, report


def test_scores_are_corpus_level_per_source_and_overall():
    identity = make_normalizer([])
    results = [
        LineResult("a.png", "A", "abed", "abcd", 0.25),
        LineResult("b.png", "A", "xyz", "xyz", 0.0),
        LineResult("c.png", "B", "hello there", "hello world", 5 / 11),
    ]
    scores = {score.source: score for score in scores_by_source(results, identity)}
    assert scores["A"].lines == 2 and scores["A"].cer == pytest.approx(1 / 7)
    assert scores["A"].wer == pytest.approx(1 / 2)
    assert scores["B"].wer == pytest.approx(1 / 2)
    assert scores["overall"].cer == pytest.approx(6 / 18)


def test_lines_with_empty_reference_are_left_out_of_corpus_scores():
    results = [LineResult("a.png", "A", "noise", "", 1.0)]
    score = scores_by_source(results, make_normalizer([]))[0]
    assert score.lines == 0 and math.isnan(score.cer)


def test_normalizations():
    assert make_normalizer(["case"])("Hello World") == "hello world"
    assert make_normalizer(["punctuation"])("Hello, world!  (x)") == "Hello world x"
    # always: NFC, and whitespace (a page's line breaks and the blank line between its blocks) as one space
    assert make_normalizer([])(" A,\n\nb  cafe\u0301 ") == "A, b caf\u00e9"
    with pytest.raises(ConfigError, match="unknown --normalize"):
        make_normalizer(["whitespace"])


def test_a_perfect_reading_of_a_page_of_two_blocks_scores_zero():
    """The job's page text puts a blank line between blocks; the ground truth's lines are joined by one."""
    normalize = make_normalizer([])
    results = score_pages([PageTruth(Path("p.xml"), Path("p.png"), "A", "first line\nsecond line\nnew block")],
                          ["first line\nsecond line\n\nnew block"], normalize)
    score = scores_by_source(results, normalize)[-1]
    assert (score.cer, score.wer) == (0.0, 0.0)


def test_line_cer_handles_empty_reference():
    assert line_cer("", "") == 0.0
    assert line_cer("", "x") == 1.0
    assert line_cer("abcd", "abed") == pytest.approx(0.25)


def test_report_lists_worst_lines_first(tmp_path):
    results = [LineResult("good.png", str(tmp_path), "ok", "ok", 0.0), LineResult("bad.png", str(tmp_path), "xx", "ok", 1.0)]
    report = format_report(scores_by_source(results, make_normalizer([])), results, worst=1)
    assert str(tmp_path / "bad.png") in report and "good.png" not in report


def write_page_xml(folder: Path, image_name: str, size: tuple[int, int], lines: list[dict]) -> Path:
    """A minimal PAGE 2019 file: one region, one TextLine (box polygon + text) per line, in the given order."""
    text_lines = "".join(
        f'<TextLine id="l{index}"><Coords points="{x0},{y0} {x1},{y0} {x1},{y1} {x0},{y1}"/>'
        f"<TextEquiv><Unicode>{escape(line['text'])}</Unicode></TextEquiv></TextLine>"
        for index, line in enumerate(lines) for x0, y0, x1, y1 in [line["bbox"]])
    path = folder / f"{Path(image_name).stem}.xml"
    path.write_text(
        '<PcGts xmlns="http://schema.primaresearch.org/PAGE/gts/pagecontent/2019-07-15">'
        f'<Page imageFilename="{image_name}" imageWidth="{size[0]}" imageHeight="{size[1]}">'
        f'<TextRegion id="r0">{text_lines}</TextRegion></Page></PcGts>', encoding="utf-8")
    return path


def test_eval_pages_runs_the_whole_job_on_page_xml_images(tmp_path, capfd):
    """--pages: the bundled model reads a synthetic page through detection and recognition; the page
    text is scored against the PAGE file's lines (and an empty prediction would score 100%). A copy of the image
    under another name, which the job reads once as a duplicate, had scored as empty text. Ray's core-worker log
    lines stay off the console, as they do for ``run`` (they had reached it)."""
    document = write_document_set(tmp_path / "docs", count=1, seed=5, dpi=150, formats=("tiff",),
                                  pages_per_document=(1, 1), two_column_share=0.0)[0]
    truth = load_ground_truth(document)["pages"][0]
    folder = tmp_path / "pages"
    folder.mkdir()
    with Image.open(document) as image:
        image.save(folder / "scan.png")
        size = image.size
    in_order = sorted(truth["lines"], key=lambda line: (line["block"], line["order"]))
    write_page_xml(folder, "scan.png", size, in_order)
    (folder / "scan-copy.png").write_bytes((folder / "scan.png").read_bytes())
    write_page_xml(folder, "scan-copy.png", size, in_order)
    predictions = tmp_path / "pages.jsonl"
    assert eval_command(parse(["--pages", str(folder), "--predictions", str(predictions), "--worst", "0",
                               "--device", "cpu", "--max-new-tokens", "96"])) == ExitCode.ok
    report, console = capfd.readouterr()
    assert report.splitlines()[0].split()[:2] == ["source", "pages"]
    assert not [line for line in console.splitlines() if ray_line_start(line.encode()) is not None], console
    rows = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    assert sorted(row["image"] for row in rows) == [str(folder / "scan-copy.xml"), str(folder / "scan.xml")]
    for row in rows:
        assert len(row["reference"].splitlines()) == len(truth["lines"])
        assert row["cer"] < 0.05, row


def test_eval_pages_refuses_pages_the_job_cannot_read_as_eval_lines_does(tmp_path, tiny_model, caplog):
    """A page image the job could not read had scored as 100% CER with exit 0, logged once for its document and again
    for its page, where --lines refuses images it cannot read (exit 2)."""
    folder = tmp_path / "pages"
    folder.mkdir()
    Image.new("L", (200, 100), 255).save(folder / "good.png")
    Image.new("L", (200, 100), 255).save(folder / "cut.png", compress_level=0)
    (folder / "cut.png").write_bytes((folder / "cut.png").read_bytes()[:5000])  # its header whole, its pixels cut off
    (folder / "bad.png").write_bytes(b"not an image")
    for name in ("good", "cut", "bad"):
        write_page_xml(folder, f"{name}.png", (200, 100), [{"text": "a line", "bbox": (10, 10, 150, 40)}])
    with pytest.raises(ConfigError) as refused, caplog.at_level(logging.WARNING):
        eval_command(parse(["--model", str(tiny_model), "--pages", str(folder), "--device", "cpu",
                            "--max-new-tokens", "4"]))
    assert str(refused.value).startswith("2 page images cannot be read, so the score would leave them out: ")
    assert str(refused.value).endswith("(move each out with its PAGE/ALTO file to score the rest)")
    assert all(str(refused.value).count(str(folder / name)) == 1 for name in ("bad.png", "cut.png"))
    assert "good.png" not in str(refused.value) and "not read" not in caplog.text


def test_a_page_file_given_by_itself_is_named_as_it_is_and_a_page_without_text_is_refused(tmp_path):
    """--predictions had named a PAGE file given by itself ``page.xml/page.xml``; a page with no line of text had
    scored as nan% with exit 0, where an empty --lines folder is an error."""
    import io

    from pipeline.evaluate import read_page_truth, write_predictions

    Image.new("L", (200, 100), 255).save(tmp_path / "scan.png")
    page = write_page_xml(tmp_path, "scan.png", (200, 100), [{"text": "a line", "bbox": (10, 10, 150, 40)}])
    [truth] = read_page_truth([page])
    out = io.StringIO()
    write_predictions(out, score_pages([truth], ["a line"], make_normalizer([])))
    assert json.loads(out.getvalue())["image"] == str(page)

    class Console(io.TextIOBase):  # written to only, as a notebook's output is: no file descriptor, no seek
        def __init__(self) -> None:
            self.text = ""

        def writable(self) -> bool:
            return True

        def write(self, text: str) -> int:
            self.text += text
            return len(text)

    console = Console()
    write_predictions(console, score_pages([truth], ["a line"], make_normalizer([])))  # it had raised on seek
    assert json.loads(console.text)["image"] == str(page)
    write_page_xml(tmp_path, "scan.png", (200, 100), [{"text": " ", "bbox": (10, 10, 150, 40)}])
    with pytest.raises(ConfigError, match=f"page {page} holds no line with text"):
        read_page_truth([tmp_path])


def test_an_evaluation_that_fails_leaves_an_earlier_predictions_file_as_it_was(tmp_path, tiny_model):
    """--predictions had been emptied before the evaluation: one that then failed (a damaged line image) had lost
    the predictions an earlier evaluation wrote there, and one into a new path had left an empty file."""
    lines = write_lines(tmp_path / "lines", ["alpha beta", "gamma", "delta"])
    (lines / "l1.png").write_bytes(b"no image")
    (lines / "l2.png").write_bytes(b"")
    earlier = tmp_path / "earlier.jsonl"
    earlier.write_text('{"image": "l0.png"}\n', encoding="utf-8")
    common = ["--model", str(tiny_model), "--lines", str(lines), "--device", "cpu", "--max-new-tokens", "8"]
    for predictions in (earlier, tmp_path / "new.jsonl"):
        # every image that cannot be read named at once (the first alone had been)
        with pytest.raises(ConfigError, match="^2 line images cannot be read, so the score would leave them out: "
                                              ".*l1.png cannot be read.*; .*l2.png cannot be read"):
            eval_command(parse([*common, "--predictions", str(predictions)]))
    assert earlier.read_text(encoding="utf-8") == '{"image": "l0.png"}\n'
    assert not (tmp_path / "new.jsonl").exists()
    write_lines(tmp_path / "whole", ["delta"])
    assert eval_command(parse([*common[:3], str(tmp_path / "whole"), *common[4:], "--predictions", str(earlier)])) == 0
    [row] = [json.loads(line) for line in earlier.read_text(encoding="utf-8").splitlines()]
    assert row["reference"] == "delta"


def test_predictions_go_to_a_pipe_or_dev_null_as_they_did(tmp_path, tiny_model):
    """``--predictions >(gzip > p.gz)`` (a pipe) and ``--predictions /dev/null`` had failed the evaluation after all
    its work (exit 7): the file was emptied by seeking, which a pipe cannot do and /dev/null refuses."""
    import os
    import threading

    lines = write_lines(tmp_path / "lines", ["alpha"])
    common = ["--model", str(tiny_model), "--lines", str(lines), "--device", "cpu", "--max-new-tokens", "8"]
    assert eval_command(parse([*common, "--predictions", os.devnull])) == ExitCode.ok
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text(encoding="utf-8")), daemon=True)
    reader.start()
    assert eval_command(parse([*common, "--predictions", str(fifo)])) == ExitCode.ok
    reader.join(timeout=30)
    [row] = [json.loads(line) for line in received[0].splitlines()]
    assert row["reference"] == "alpha"


def test_a_line_evaluation_does_not_load_ray(tmp_path, tiny_model):
    """eval --lines reads on this process alone: its progress lines (pipeline.progress) had pulled in Ray, half a second
    and its modules' memory for nothing."""
    import subprocess
    import sys

    lines = write_lines(tmp_path / "lines", ["alpha"])
    script = ("import sys\nfrom pipeline.cli import main\n"
              f"assert main(['eval', '--model', {str(tiny_model)!r}, '--lines', {str(lines)!r}, '--device', 'cpu', "
              "'--max-new-tokens', '4']) == 0\nprint('ray loaded:', 'ray' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "ray loaded: False"
