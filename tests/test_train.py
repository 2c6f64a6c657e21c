"""Training on tiny models: the loss falls, checkpoints resume, the output loads back; data readers."""

from __future__ import annotations

import fcntl
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw, ImageFont

from operators.errors import ConfigError, ExitCode, ModelLoadError, OutputLocked, OutputNotWritable, WriteFailed
from helpers import TINY_CORPUS, build_tiny_random_trocr, run_on_a_terminal
from operators.crops import cut_polygon
from operators.model import cpu_has_native_bf16, load_trocr
from operators.preprocess import WIDTH_SCALE_KEY
from pipeline.cli import main
from pipeline.scoring import corpus_error_rates
from operators.text import make_normalizer
from pipeline.train.config import DataSource, LayerSelection, TrainConfig, load_train_config
from operators.words import fit_loose_crop, fit_rows_to_ink
from pipeline.train.data import LabelCollator, read_line_folder, read_line_sources, read_page_lines, validation_lines
from pipeline.train.loop import (BEST_STATE, CHECKPOINT_PREFIX, RUN_LOCK, TRAINER_STATE, UNREAD_ON_RESUME,
                                 holding_work_dir, latest_checkpoint, learning_rate_factor, start_run, train)
from pipeline.train.model import SAVING_PREFIX, build_trocr, save_trocr, shrink_trocr
from pipeline.train.tokenizer import train_tokenizer

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
TEXTS = ["hello world", "quick fox", "lazy dog 42", "OCR lines"]


def render(text: str, height: int = 32) -> Image.Image:
    font = ImageFont.truetype(FONT, size=int(height * 0.6))
    image = Image.new("L", (int(font.getlength(text)) + 12, height), 255)
    ImageDraw.Draw(image).text((6, height * 0.15), text, font=font, fill=0)
    return image


@pytest.fixture(scope="module")
def line_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lines")
    for index, text in enumerate(TEXTS):
        render(text).save(folder / f"line_{index:03d}.bin.png")
        (folder / f"line_{index:03d}.gt.txt").write_text(text + "\n", encoding="utf-8")
    (folder / "unlabelled.png").write_bytes(b"")  # no .gt.txt: ignored
    return folder


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    return build_tiny_random_trocr(tmp_path_factory.mktemp("base"))


def fine_tune_config(tmp_path: Path, base_model: Path, line_folder: Path, steps: int) -> TrainConfig:
    return TrainConfig(
        output_dir=tmp_path / "model",
        work_dir=tmp_path / "work",
        base_model=str(base_model),
        train_data=[{"kind": "folder", "path": line_folder}],
        validation_data=[{"kind": "folder", "path": line_folder}],
        steps=steps,
        batch_size=4,
        learning_rate=3e-3,
        warmup_steps=2,
        checkpoint_every=10,
        validate_every=10,
        torch_threads=1,
    )


def test_fine_tuning_lowers_the_loss_and_saves_a_loadable_model(tmp_path, base_model, line_folder, names_synced):
    metrics: list[dict] = []
    output = train(fine_tune_config(tmp_path, base_model, line_folder, steps=20), show_progress=False,
                   report=metrics.append)
    losses = [row["loss"] for row in metrics]
    assert len(losses) == 20
    assert np.mean(losses[-3:]) < losses[0] - 1.0  # nats; an untrained model stays near ln(vocab)
    assert [row["step"] for row in metrics if "validation_cer" in row] == [10, 20]
    bundle = load_trocr(str(output), device="cpu")
    assert bundle.preprocessor.input_size == (32, 128)
    assert latest_checkpoint(tmp_path / "work").name == f"{CHECKPOINT_PREFIX}20"
    # each file on the disk before its rename (over the one it replaces, in output_dir), and a checkpoint's folder before
    # older checkpoints go: after a power cut, a checkpoint counted complete or the model best.json vouches for could
    # otherwise hold empty files
    checkpoint = latest_checkpoint(tmp_path / "work")
    renamed = [*checkpoint.iterdir(), *output.iterdir(), tmp_path / "work" / BEST_STATE]
    assert [path for path in renamed if not any(SAVING_PREFIX in name or name.endswith(".partial")
                                                for name in names_synced(path))] == []
    assert str(checkpoint) in names_synced(checkpoint)
    saved = json.loads((output / "tokenizer.json").read_text())  # no training-time truncation for its users
    assert saved["truncation"] is None and saved["padding"] is None
    # every file readable as the umask lets it (safetensors had written the weights for their owner alone, 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in [*output.iterdir(), *checkpoint.iterdir()]
            if path.is_file() and path.suffix == ".safetensors"} == {"model.safetensors": oct(0o666 & ~umask)}


def test_two_ray_train_workers_train_one_model_through_the_cli(ray_local, tmp_path, base_model, line_folder, capfd):
    """``train --workers 2``, in this process on the session's Ray instance: Ray Train's TorchTrainer, DDP
    over gloo on two CPU workers."""
    config = fine_tune_config(tmp_path, base_model, line_folder, steps=4).model_dump(mode="json")
    config.update(checkpoint_every=2, validate_every=2)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    command = ["train", "--config", str(tmp_path / "train.yaml"), "--workers", "2", "--no-progress"]
    # a work_dir another run holds is refused by the driver in one line (rank 0's refusal had come back from Ray
    # Train as a traceback, exit 1)
    (tmp_path / "work").mkdir()
    with open(tmp_path / "work" / RUN_LOCK, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(command) == ExitCode.output_locked
    refused = capfd.readouterr().err
    assert "work is in use by another training run" in refused and "Traceback" not in refused, refused[-3000:]
    assert main(command) == 0
    # rank 0's validation line (it reaches this process a moment after the run): the last step ran
    # data-parallel on two workers; Ray Train's per-step reports stay off the console
    logged, deadline = "", time.monotonic() + 30
    while not re.search(r"step 4: loss .*, 2 workers", logged) and time.monotonic() < deadline:
        time.sleep(0.5)
        captured = capfd.readouterr()
        logged += captured.out + captured.err
    assert re.search(r"step 4: loss .*, 2 workers", logged), logged[-3000:]
    assert "Reporting training result" not in logged, logged[-3000:]
    assert latest_checkpoint(tmp_path / "work").name == f"{CHECKPOINT_PREFIX}4"
    assert load_trocr(str(tmp_path / "model"), device="cpu").preprocessor.input_size == (32, 128)
    # a refusal of the workers' own (no step left to train) ends with its line and exit code, as in one process: it
    # had ended in Ray Train's WorkerGroupError traceback, exit 1, and the worker's own log of it had come first
    assert main([*command, "--resume"]) == ExitCode.bad_args
    refused = capfd.readouterr().err.strip().splitlines()
    assert re.fullmatch(r"trocr-pipeline: error: --resume: .*no step is left to train.*", refused[-1]), refused[-20:]
    # (Ray Train's own threads may still print theirs on this shared instance: its placement-group cleaner's)
    assert "Error in training function" not in "\n".join(refused), refused[-40:]


def test_cli_prints_each_validation_on_its_own_line_above_the_step_bar(tmp_path, base_model, line_folder):
    """On a terminal the bar is redrawn at its own pace (a redraw each step had filled a log file with one per step);
    in a log there is no bar, whose redraws had run together into one line of ``\\r``s; without the bar and without
    validation, each checkpoint still says how the run goes (nothing had been printed)."""
    config = fine_tune_config(tmp_path, base_model, line_folder, steps=60).model_dump(mode="json")
    config.update(checkpoint_every=30, validate_every=30)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "pipeline.cli", "train", "--config", str(tmp_path / "train.yaml")]
    status, shown = run_on_a_terminal(command, timeout=600)
    assert status == 0, shown[-3000:]
    lines = shown.replace("\r", "\n").splitlines()
    validations = [line for line in lines if "validation CER" in line]
    assert len(validations) == 2 and all(line.startswith(("20", "step")) for line in validations), validations
    assert any(line.startswith("train: 100%") for line in lines), shown[-3000:]
    assert len([line for line in lines if line.startswith("train:")]) < 30
    assert not any("Writing model shards" in line for line in lines)
    config.update(work_dir=str(tmp_path / "logged"), output_dir=str(tmp_path / "logged-model"))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "\r" not in done.stderr and "train:" not in done.stderr, done.stderr[-3000:]
    assert len(re.findall(r"step (\d+): loss [\d.]+, validation CER", done.stderr)) == 2, done.stderr[-3000:]
    config.update(validation_data=[], work_dir=str(tmp_path / "quiet"), output_dir=str(tmp_path / "quiet-model"))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run(command + ["--no-progress"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.findall(r"step (\d+): loss [\d.]+, checkpoint checkpoint-\1", done.stderr) == ["30", "60"]


def test_progress_lines_in_a_log_count_a_resumed_run_from_where_it_resumed():
    """A training run's progress in a log: the first call (the step a resume starts at) says nothing and sets where
    the ETA's rate counts from."""
    from pipeline.progress import PeriodicProgress

    console = io.StringIO()
    progress = PeriodicProgress("training", stream=console, interval_s=0)
    progress(50, 100)
    assert console.getvalue() == ""
    progress(60, 100, "step 60/100, loss 1.2345")
    assert re.fullmatch(r"progress: training 60% done, step 60/100, loss 1.2345, 0:00 elapsed, ETA 0:00\n",
                        console.getvalue()), console.getvalue()


def test_stop_after_step_ends_early_on_the_schedule_of_all_steps(tmp_path, base_model, line_folder):
    config = fine_tune_config(tmp_path, base_model, line_folder, steps=12).model_copy(update={"stop_after_step": 4})
    metrics: list[dict] = []
    train(config, show_progress=False, report=metrics.append)
    assert [row["step"] for row in metrics] == [1, 2, 3, 4]
    checkpoint = latest_checkpoint(tmp_path / "work")
    assert checkpoint.name == f"{CHECKPOINT_PREFIX}4"
    saved = torch.load(checkpoint / TRAINER_STATE, weights_only=False)
    expected_lr = config.learning_rate * learning_rate_factor(4, config.warmup_steps, 12, config.min_lr_ratio)
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(expected_lr)
    metrics.clear()
    train(config.model_copy(update={"stop_after_step": None}), resume=True, show_progress=False, report=metrics.append)
    assert [row["step"] for row in metrics] == list(range(5, 13))


def test_fp16_training_on_the_cpu_is_refused(tmp_path, base_model, line_folder):
    config = fine_tune_config(tmp_path, base_model, line_folder, steps=2).model_copy(
        update={"precision": "fp16", "device": "cpu"})
    with pytest.raises(ConfigError, match="fp16 is CUDA autocast"):
        train(config)
    assert not (tmp_path / "model").exists()


def test_bf16_training_on_the_cpu_runs_in_bf16_where_the_cpu_has_it_and_is_refused_elsewhere(
        tmp_path, base_model, line_folder):
    config = fine_tune_config(tmp_path, base_model, line_folder, steps=2).model_copy(
        update={"precision": "bf16", "device": "cpu"})
    if not cpu_has_native_bf16():
        with pytest.raises(ConfigError, match="native bf16"):
            train(config)
        assert not (tmp_path / "model").exists()
        return
    run, _ = start_run(config, resume=False)
    assert run.autocast_dtype == torch.bfloat16
    metrics: list[dict] = []
    train(config, show_progress=False, report=metrics.append)
    assert [row["step"] for row in metrics] == [1, 2] and all(math.isfinite(row["loss"]) for row in metrics)
    assert load_trocr(str(tmp_path / "model")).model.dtype == torch.float32  # weights stay fp32


def test_resume_continues_from_the_newest_checkpoint(tmp_path, base_model, line_folder):
    train(fine_tune_config(tmp_path, base_model, line_folder, steps=10), show_progress=False)
    metrics: list[dict] = []
    train(fine_tune_config(tmp_path, base_model, line_folder, steps=12), resume=True, show_progress=False,
          report=metrics.append)
    assert [row["step"] for row in metrics] == [11, 12]
    assert latest_checkpoint(tmp_path / "work").name == f"{CHECKPOINT_PREFIX}12"


def test_width_scale_is_trained_with_and_saved_for_the_pipeline(tmp_path, base_model, line_folder):
    base = build_tiny_random_trocr(tmp_path / "base", keep_aspect=True)
    config = fine_tune_config(tmp_path, base, line_folder, steps=2).model_copy(update={"width_scale": 1.5})
    output = train(config, show_progress=False)
    assert json.loads((output / "processor_config.json").read_text())["image_processor"][WIDTH_SCALE_KEY] == 1.5
    assert load_trocr(str(output), device="cpu").preprocessor.width_scale == 1.5
    stretching = fine_tune_config(tmp_path / "stretching", base_model, line_folder, steps=2)
    with pytest.raises(ModelLoadError, match="needs trocr_pipeline_keep_aspect"):
        train(stretching.model_copy(update={"width_scale": 1.5}), show_progress=False)


def test_base_layers_make_a_smaller_model_of_the_chosen_layers(tmp_path, line_folder):
    tokenizer = train_tokenizer(TINY_CORPUS, "roberta", vocab_size=300)
    model, processor = build_trocr(tokenizer, input_size=(32, 128), patch_size=(16, 16), hidden_size=32, encoder_layers=3,
                                   encoder_heads=2, decoder_layers=2, decoder_heads=2, max_target_tokens=8)
    student = shrink_trocr(model, encoder_layers=(2, 0), decoder_layers=(1,))
    assert (student.config.encoder.num_hidden_layers, student.config.decoder.decoder_layers) == (2, 1)
    pairs = [(student.encoder.layers[0], model.encoder.layers[2]), (student.encoder.layers[1], model.encoder.layers[0]),
             (student.decoder.model.decoder.layers[0], model.decoder.model.decoder.layers[1]),
             (student.decoder.output_projection, model.decoder.output_projection)]
    for kept, original in pairs:
        assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), original.state_dict().values(), strict=True))
    # the kept decoder layer caches as layer 0 of 1: greedy decoding reads the same with and without the cache
    pixels = torch.randn(2, 3, 32, 128)
    with torch.no_grad():
        cached = student.generate(pixel_values=pixels, max_new_tokens=6, min_new_tokens=6, use_cache=True)
        uncached = student.generate(pixel_values=pixels, max_new_tokens=6, min_new_tokens=6, use_cache=False)
    assert torch.equal(cached, uncached)
    for encoder_layers, decoder_layers in (((0, 0), (0,)), ((3,), (0,)), ((0,), (-1,))):
        with pytest.raises(ConfigError, match="distinct layer indices"):
            shrink_trocr(model, encoder_layers, decoder_layers)
    # through training: the fine-tuned student is saved with its smaller architecture and loads back
    base = save_trocr(model, processor, tmp_path / "base")
    config = fine_tune_config(tmp_path, base, line_folder, steps=2).model_copy(
        update={"base_layers": LayerSelection(encoder=(0, 2), decoder=(1,))})
    trained = load_trocr(str(train(config, show_progress=False)), device="cpu").model
    assert (trained.config.encoder.num_hidden_layers, trained.config.decoder.decoder_layers) == (2, 1)


def test_from_scratch_builds_tokenizer_and_model_from_the_spec(tmp_path):
    config = TrainConfig(
        output_dir=tmp_path / "model",
        work_dir=tmp_path / "work",
        model={"input_size": [16, 64], "patch_size": [16, 8], "hidden_size": 32, "encoder_layers": 1,
               "encoder_heads": 2, "decoder_layers": 1, "decoder_heads": 2, "max_target_tokens": 24,
               "vocab_size": 300, "tokenizer_corpus_lines": 50},
        train_data=[{"kind": "synth", "seed": 5}],
        validation_data=[{"kind": "synth", "seed": 6, "count": 3}],
        steps=2,
        batch_size=2,
        torch_threads=1,
    )
    bundle = load_trocr(str(train(config, show_progress=False)), device="cpu")
    assert bundle.preprocessor.input_size == (16, 64) and bundle.preprocessor.keep_aspect
    assert len(bundle.tokenizer) == 300
    assert bundle.model.config.encoder.num_hidden_layers == 1


@pytest.mark.parametrize("shape, error", [
    ({"input_size": [32, 100], "patch_size": [16, 8]}, r"model: input_size \[32, 100\] is not a multiple of patch_size"),
    ({"patch_size": [0, 8]}, "must be positive"),
    ({"hidden_size": 32, "decoder_heads": 3}, "hidden_size 32 is not a multiple of decoder_heads 3"),
    ({"hidden_size": 32, "encoder_heads": 3}, "hidden_size 32 is not a multiple of encoder_heads 3"),
])
def test_a_model_spec_of_impossible_shapes_is_refused_when_the_config_is_read(tmp_path, shape, error):
    """It had failed in a ValueError traceback after the tokenizer was trained, or (encoder heads) trained a model with
    a narrower attention than asked for."""
    config = {"output_dir": str(tmp_path / "model"), "work_dir": str(tmp_path / "work"), "model": shape,
              "train_data": [{"kind": "synth"}], "steps": 1}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=error):
        load_train_config(tmp_path / "train.yaml")


def test_labels_pad_with_minus_100_and_drop_the_start_token(base_model):
    tokenizer = load_trocr(str(base_model), device="cpu").tokenizer
    labels = LabelCollator(tokenizer, tokenizer.bos_token_id, max_target_tokens=16).labels(["a", "longer text"])
    assert labels.shape[0] == 2
    assert (labels[:, 0] != tokenizer.bos_token_id).all()
    assert labels[0, -1] == -100 and (labels[1] != -100).all()
    assert tokenizer.decode(labels[1][labels[1] >= 0], skip_special_tokens=True) == "longer text"


def test_learning_rate_warms_up_then_decays_to_the_floor():
    factors = [learning_rate_factor(step, 10, 100, 0.1) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[50] < factors[10] and factors[100] == pytest.approx(0.1)


def test_config_needs_exactly_one_model_source(tmp_path):
    config = {"output_dir": "o", "work_dir": "w", "train_data": [{"kind": "synth"}], "steps": 1}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="exactly one of base_model"):
        load_train_config(path)
    path.write_text(yaml.safe_dump({**config, "model": {}, "base_layers": {"encoder": [0], "decoder": [0]}}))
    with pytest.raises(ConfigError, match="base_layers selects layers of base_model"):
        load_train_config(path)
    path.write_text(yaml.safe_dump({**config, "base_model": "x", "bogus": 1}))
    with pytest.raises(ConfigError, match="bogus"):
        load_train_config(path)
    path.write_text(yaml.safe_dump({**config, "base_model": "x",
                                    "train_data": [{"kind": "synth", "languages": ["fr", "klingon"]}]}))
    with pytest.raises(ConfigError, match="train_data.0.languages"):
        load_train_config(path)


def test_synthetic_source_draws_its_lines_in_its_languages():
    source = DataSource(kind="synth", languages=("de",), seed=2, count=40)
    german = [line.text for line in validation_lines([source])]
    english = [line.text for line in validation_lines([source.model_copy(update={"languages": ("en",)})])]
    assert len(german) == 40 and german != english
    assert any(set(text) & set("äöüßÄÖÜ„") for text in german)


def test_line_folder_pairs_images_with_ground_truth(line_folder):
    lines = read_line_folder(line_folder)
    assert [line.text for line in lines] == TEXTS
    assert lines[0].name == "line_000.bin.png"
    assert lines[0].load_gray().dtype == np.uint8 and lines[0].load_gray().ndim == 2


def test_line_images_are_read_as_the_job_reads_a_page_image(tmp_path):
    """Training and eval had read a line with Pillow's ``convert("L")``, not as the job reads its pages: black ink on
    a transparent background came out all black, a 16-bit line almost white, a JPEG turned by its EXIF orientation
    upside down (eval CER 104%, 97%, 82%)."""
    from conftest import text_page

    from operators.rasterize import upright_gray

    line = text_page(["hello line"], size=(420, 200)).crop((100, 135, 400, 195))  # black ink on white
    ink = 255 - np.asarray(line)
    Image.fromarray(np.dstack([np.zeros_like(ink)] * 3 + [ink])).save(tmp_path / "rgba.png")
    Image.fromarray(np.dstack([np.zeros_like(ink), ink])).convert("LA").save(tmp_path / "la.png")
    Image.fromarray(np.asarray(line).astype(np.uint16) * 257).save(tmp_path / "deep.png")  # I;16
    exif = Image.Exif()
    exif[0x0112] = 3  # stored upside down, shown upright
    line.rotate(180).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    for name in ("rgba", "la", "deep", "turned"):
        (tmp_path / f"{name}.gt.txt").write_text("hello line\n", encoding="utf-8")
    expected = fit_rows_to_ink(np.asarray(line))
    lines = read_line_folder(tmp_path)
    assert [Image.open(read.path).mode for read in lines] == ["I;16", "LA", "RGBA", "L"]
    for read in lines:
        with Image.open(read.path) as image:
            assert np.array_equal(read.load_gray(), fit_rows_to_ink(upright_gray(image, str(read.path)))), read.name
        gray = read.load_gray()
        assert gray.shape == expected.shape, read.name
        assert np.abs(gray.astype(int) - expected).mean() < 3, read.name
    (tmp_path / "page.xml").write_text("""<?xml version="1.0" encoding="UTF-8"?>
<PcGts xmlns="http://schema.primaresearch.org/PAGE/gts/pagecontent/2019-07-15">
  <Page imageFilename="rgba.png" imageWidth="300" imageHeight="60"><TextRegion id="r1">
    <TextLine id="l1"><Coords points="0,0 299,0 299,59 0,59"/><TextEquiv><Unicode>hello line</Unicode></TextEquiv>
    </TextLine></TextRegion></Page></PcGts>""")
    [cut] = read_page_lines(tmp_path / "page.xml")  # a page's image too
    assert np.abs(cut.load_gray().astype(int) - expected[:, :cut.load_gray().shape[1]]).mean() < 3


def test_line_folders_name_what_cannot_be_read_and_what_is_missing(tmp_path, caplog):
    """A source without a labelled line is refused before a run trains or validates on nothing (a run with an
    empty validation set once saved no model at all); a damaged image is named when it is read; a transcription
    without an image is left out with a warning."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "orphan.gt.txt").write_text("no image\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"folder source {tmp_path / 'empty'} holds no labelled line"), \
            caplog.at_level(logging.WARNING, logger="pipeline.train.data"):
        validation_lines([DataSource(kind="folder", path=tmp_path / "empty")])
    assert "1 transcriptions have no image beside them" in caplog.text and "orphan.gt.txt" in caplog.text
    render("cut short").save(tmp_path / "damaged.png")
    (tmp_path / "damaged.png").write_bytes((tmp_path / "damaged.png").read_bytes()[:200])
    (tmp_path / "damaged.gt.txt").write_text("cut short\n", encoding="utf-8")
    render("blank").save(tmp_path / "blank.png")
    (tmp_path / "blank.gt.txt").write_text(" \n", encoding="utf-8")  # taught to write nothing, scored as all wrong
    with caplog.at_level(logging.WARNING, logger="pipeline.train.data"):
        [line] = read_line_folder(tmp_path)
    assert "1 transcriptions are empty" in caplog.text and "blank.gt.txt" in caplog.text
    with pytest.raises(ConfigError, match=f"line image {tmp_path / 'damaged.png'} cannot be read: OSError"):
        line.load_gray()
    Image.new("L", (5000, 4000), 255).save(tmp_path / "huge.png")  # a page, not a line
    (tmp_path / "huge.gt.txt").write_text("huge\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"line image {tmp_path / 'huge.png'} is 5000 x 4000 px, too large"):
        [line for line in read_line_folder(tmp_path) if line.name == "huge.png"][0].load_gray()
    (tmp_path / "latin1.gt.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    render("cafe").save(tmp_path / "latin1.png")
    with pytest.raises(ConfigError, match=f"transcription {tmp_path / 'latin1.gt.txt'} is not UTF-8"):
        read_line_folder(tmp_path)


def test_a_transcription_takes_the_image_of_its_own_stem_and_two_images_for_one_are_refused(tmp_path, caplog):
    """``x.jpg`` and ``x.png`` beside one ``x.gt.txt``: one had been taken and the other passed over without a word;
    ``x.b.jpg`` beside ``x.jpg`` had been taken as a candidate of ``x``, not named as an image without a transcription
    (``x.bin.png`` alone is still ``x``'s, as UW3 names its lines; beside ocropy's ``x.nrm.png`` the first is taken,
    the other named: a folder of them is no mistake to refuse)."""
    for name in ("x.jpg", "x.png", "y.bin.png", "y.nrm.png"):
        render("a line").save(tmp_path / name)
    for stem in ("x", "y"):
        (tmp_path / f"{stem}.gt.txt").write_text("a line\n", encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        read_line_folder(tmp_path)
    assert str(refused.value) == (f"{tmp_path}: 1 transcriptions have more than one image beside them: x.gt.txt "
                                  "(x.jpg, x.png): keep one image for each")
    (tmp_path / "x.png").unlink()
    render("another").save(tmp_path / "x.b.jpg")
    with caplog.at_level(logging.WARNING, logger="pipeline.train.data"):
        assert [line.name for line in read_line_folder(tmp_path)] == ["x.jpg", "y.bin.png"]
    assert f"{tmp_path}: 1 images have no .gt.txt beside them and are left out: x.b.jpg" in caplog.text
    assert (f"{tmp_path}: 1 images are other copies of a line whose first image is taken and are left out: "
            "y.nrm.png") in caplog.text


def test_a_line_folder_reads_every_image_kind_the_job_reads_and_leaves_out_transcriptions_of_two_lines(tmp_path,
                                                                                                       caplog):
    """A .webp, .gif or .jp2 line had been passed over ("1 transcriptions have no image beside them"), and a folder
    without lines was said to want .png|jpg|tif or PAGE/ALTO pages; a .gt.txt of two lines had been taught and scored
    as one line's text without a word."""
    with pytest.raises(ConfigError) as refused:
        read_line_sources([DataSource(kind="folder", path=tmp_path)])
    assert str(refused.value) == (f"folder source {tmp_path} holds no labelled lines "
                                  "(<name>.tif|tiff|png|jpg|jpeg|jp2|j2k|jpx|jpf|bmp|webp|gif beside <name>.gt.txt)")
    for suffix in ("webp", "gif", "jp2"):
        render(suffix).save(tmp_path / f"line.{suffix}.{suffix}")
        (tmp_path / f"line.{suffix}.gt.txt").write_text(f"{suffix}\r\n", encoding="utf-8")
    render("one").save(tmp_path / "two.png")
    (tmp_path / "two.gt.txt").write_text("one\r\ntwo\r\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="pipeline.train.data"):
        lines = read_line_folder(tmp_path)
    assert [(line.name, line.text) for line in lines] == [("line.gif.gif", "gif"), ("line.jp2.jp2", "jp2"),
                                                          ("line.webp.webp", "webp")]
    assert all((line.load_gray() < 128).any() for line in lines)
    assert f"{tmp_path}: 1 transcriptions hold more than one line and are left out: two.gt.txt" in caplog.text
    assert "have no" not in caplog.text


def test_what_a_line_folder_leaves_out_is_named_all_of_it(tmp_path, caplog):
    """Five damaged images had been given as one "(e.g. ...)", and so had empty transcriptions and images without
    one, where the README says each is named."""
    render("good").save(tmp_path / "good.png")
    (tmp_path / "good.gt.txt").write_text("good\n", encoding="utf-8")
    for index in range(5):
        (tmp_path / f"damaged{index}.png").write_bytes(b"no image")
        (tmp_path / f"damaged{index}.gt.txt").write_text("damaged\n", encoding="utf-8")
        render("blank").save(tmp_path / f"blank{index}.png")
        (tmp_path / f"blank{index}.gt.txt").write_text("\n", encoding="utf-8")
        render("alone").save(tmp_path / f"alone{index}.png")
    with caplog.at_level(logging.WARNING, logger="pipeline.train.data"):
        assert [line.name for line in validation_lines([DataSource(kind="folder", path=tmp_path)])] == ["good.png"]
    assert (f"5 transcriptions are empty and are left out: {', '.join(f'blank{i}.gt.txt' for i in range(5))}"
            in caplog.text)
    assert (f"5 images have no .gt.txt beside them and are left out: {', '.join(f'alone{i}.png' for i in range(5))}"
            in caplog.text)
    assert "5 line images cannot be read and are left out: " in caplog.text
    assert all(f"line image {tmp_path / f'damaged{i}.png'} cannot be read" in caplog.text for i in range(5))


def test_training_names_bad_lines_before_its_first_step_and_trains_on_the_others(tmp_path, base_model, line_folder,
                                                                                   caplog):
    """A damaged image had stopped a run when the shuffle first drew it, or at the first validation, 500 steps of
    CPU in; an image without a transcription, a label too long for the decoder and characters the tokenizer lacks
    were taught or left out without a word; with loader workers, a source's error came as a worker's traceback."""
    lines = shutil.copytree(line_folder, tmp_path / "lines")
    render("cut short").save(lines / "damaged.png")
    (lines / "damaged.png").write_bytes((lines / "damaged.png").read_bytes()[:200])
    (lines / "damaged.gt.txt").write_text("cut short\n", encoding="utf-8")
    render("no text").save(lines / "untranscribed.png")
    render("long").save(lines / "long.png")
    (lines / "long.gt.txt").write_text("a very long line " * 20 + "\n", encoding="utf-8")
    config = fine_tune_config(tmp_path, base_model, lines, steps=2).model_copy(update={"loader_workers": 1})
    with caplog.at_level(logging.WARNING, logger="pipeline.train.data"):
        train(config, show_progress=False)
    assert "1 line images cannot be read and are left out" in caplog.text and "damaged.png" in caplog.text
    assert "2 images have no .gt.txt beside them" in caplog.text  # the folder's unlabelled.png and this one
    label = json.loads((base_model / "generation_config.json").read_text())["max_new_tokens"]  # one more had been said
    assert f"1 transcriptions are longer than a label's {label} tokens and are taught cut short" in caplog.text
    # said once, not again by each stream that reads the folder (here the one in this process, without workers)
    caplog.clear()
    once = config.model_copy(update={"loader_workers": 0, "steps": 1, "work_dir": tmp_path / "work-once",
                                     "output_dir": tmp_path / "model-once",
                                     "validation_data": [DataSource(kind="folder", path=line_folder)]})
    with caplog.at_level(logging.WARNING, logger="pipeline.train.data"):
        train(once, show_progress=False)
    assert caplog.text.count("2 images have no .gt.txt beside them") == 1, caplog.text
    (lines / "latin1.gt.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    render("cafe").save(lines / "latin1.png")
    shutil.rmtree(tmp_path / "work")
    with pytest.raises(ConfigError) as refused:
        train(config.model_copy(update={"replace_output": True}), show_progress=False)
    assert str(refused.value).startswith(f"transcription {lines / 'latin1.gt.txt'} is not UTF-8")
    assert "Traceback" not in str(refused.value)


def test_characters_a_tokenizer_has_no_token_for_are_named(tmp_path, caplog):
    """A word-piece tokenizer (XLM-R's, microsoft/trocr-small's) teaches a character it lacks as unknown."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pipeline.train.data import check_training_lines

    words = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    for index, text in enumerate(["hello world", "hello 漢字"]):
        render("x").save(tmp_path / f"{index}.png")
        (tmp_path / f"{index}.gt.txt").write_text(text, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="pipeline.train.data"):
        check_training_lines([DataSource(kind="folder", path=tmp_path)], LabelCollator(tokenizer, 1, 8))
    assert "1 transcriptions hold characters the tokenizer has no token for" in caplog.text and "漢字" in caplog.text


def test_a_line_folder_cut_with_a_margin_has_its_neighbours_ink_painted_out_only_when_it_says_so(tmp_path):
    """The line's text, then below it, touching the bottom edge, the top of the next line's capitals (what a
    crop cut with a margin holds); a tight folder's image is only fitted, as its own accents may touch its edge."""
    text = np.asarray(render("first line", height=44))
    image = np.full((70, text.shape[1]), 255, np.uint8)
    image[:44] = text
    image[60:, 10:16] = 0  # a capital's stem from the line below, cut by the bottom edge
    Image.fromarray(image).save(tmp_path / "loose.png")
    (tmp_path / "loose.gt.txt").write_text("first line\n", encoding="utf-8")
    [tight] = read_line_folder(tmp_path)
    [loose] = read_line_sources([DataSource(kind="folder", path=tmp_path, paint_out_neighbours=True)])
    assert np.array_equal(tight.load_gray(), fit_rows_to_ink(image))
    assert np.array_equal(loose.load_gray(), fit_loose_crop(image))
    assert (tight.load_gray()[-3:] < 128).any() and len(loose.load_gray()) < len(tight.load_gray())


def test_training_lines_teach_standard_unicode_for_mufi_characters(tmp_path):
    render("Thaler").save(tmp_path / "dta.png")
    (tmp_path / "dta.gt.txt").write_text("Th\ue42cler \ue72bber\n", encoding="utf-8")
    render("ete").save(tmp_path / "nfd.png")  # a byte order mark and decomposed accents: "été" as the model writes it
    (tmp_path / "nfd.gt.txt").write_text("\ufeffe\u0301te\u0301\r\n", encoding="utf-8")
    assert [line.text for line in read_line_folder(tmp_path)] == ["Tha\u0364ler u\u0364ber", "\u00e9t\u00e9"]


def page_image(tmp_path: Path) -> Path:
    image = Image.new("L", (400, 100), 255)
    image.paste(render("first line"), (10, 5))
    image.paste(render("second line"), (10, 55))
    path = tmp_path / "page.png"
    image.save(path)
    return path


def test_page_xml_lines_are_cut_from_their_polygons(tmp_path):
    page_image(tmp_path)
    (tmp_path / "page.xml").write_text("""<?xml version="1.0" encoding="UTF-8"?>
<PcGts xmlns="http://schema.primaresearch.org/PAGE/gts/pagecontent/2019-07-15">
  <Page imageFilename="page.png" imageWidth="400" imageHeight="100"><TextRegion id="r1">
    <TextLine id="l1"><Coords points="5,3 200,3 200,40 5,40"/>
      <TextEquiv index="2"><Unicode>wrong</Unicode></TextEquiv>
      <TextEquiv index="1"><Unicode>first line</Unicode></TextEquiv></TextLine>
    <TextLine id="l3"><Coords points="5,92 20,92 20,99 5,99"/><TextEquiv><Unicode></Unicode></TextEquiv></TextLine>
  </TextRegion><TextRegion id="r2">
    <TextLine id="l2"><Coords points="5,52 220,52 220,90 5,90"/>
      <Word id="w1"><Coords points="5,52 90,52 90,90 5,90"/><TextEquiv><Unicode>second</Unicode></TextEquiv></Word>
      <Word id="w2"><Coords points="100,52 220,52 220,90 100,90"/>
        <Glyph id="g1"><Coords points="100,52 110,52 110,90"/><TextEquiv><Unicode>li</Unicode></TextEquiv></Glyph>
        <Glyph id="g2"><Coords points="110,52 120,52 120,90"/><TextEquiv><Unicode>ne</Unicode></TextEquiv></Glyph>
      </Word></TextLine>
  </TextRegion>
  <ReadingOrder><OrderedGroup id="ro"><RegionRefIndexed index="1" regionRef="r1"/>
    <RegionRefIndexed index="0" regionRef="r2"/></OrderedGroup></ReadingOrder></Page></PcGts>""")
    # the lowest index is PAGE's main text; a line's text may be given by its words (or their glyphs) only;
    # regions come in the ReadingOrder's order, not the file's
    lines = read_page_lines(tmp_path)
    assert [line.text for line in lines] == ["second line", "first line"]
    lines.reverse()
    first = lines[0].load_gray()
    assert first.shape[1] == 196 and first.shape[0] < 38  # the polygon's width, its rows fitted to the ink
    assert (first < 128).any(axis=1)[[2, -3]].all()


def test_a_damaged_page_image_is_named_and_its_lines_left_out(tmp_path, caplog):
    """It had ended the run in Pillow's traceback."""
    page_image(tmp_path)
    for name, image in (("good", "page.png"), ("damaged", "damaged.png")):
        (tmp_path / f"{name}.xml").write_text(f"""<?xml version="1.0" encoding="UTF-8"?>
<PcGts xmlns="http://schema.primaresearch.org/PAGE/gts/pagecontent/2019-07-15">
  <Page imageFilename="{image}" imageWidth="400" imageHeight="100"><TextRegion id="r1">
    <TextLine id="l1"><Coords points="5,3 200,3 200,40 5,40"/><TextEquiv><Unicode>first line</Unicode></TextEquiv>
    </TextLine></TextRegion></Page></PcGts>""")
    (tmp_path / "damaged.png").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        lines = read_line_sources([DataSource(kind="pages", path=tmp_path)])
    assert [line.name for line in lines] == ["good:0"]
    assert re.search(r"damaged.xml: page image .*damaged.png cannot be read \(UnidentifiedImageError", caplog.text)


@pytest.mark.parametrize("case", ["two-page tiff", "pdf", "turned", "other size", "camera mpo", "turned tiff"])
def test_a_page_file_whose_image_is_not_its_page_is_refused_for_training_and_scoring(tmp_path, case):
    """The job's PAGE and ALTO exports without METS name the source file: page 2 of a TIFF had been cut from page 1's
    pixels and trained on and scored against with page 2's text, without a word; so too a page turned upright. eval,
    which scores the text alone, refuses only a file that does not say which page; a camera's MPO is one page, and a
    TIFF turned by its orientation tag is the size it reads as."""
    from pipeline.evaluate import read_page_truth

    first = page_image(tmp_path)
    image, turn, size = "page.png", "", 'imageWidth="400" imageHeight="100"'
    if case == "two-page tiff":
        image = "letters.tif"
        Image.open(first).save(tmp_path / image, save_all=True, append_images=[Image.open(first)])
    elif case == "pdf":
        image = "letters.pdf"
        Image.open(first).convert("RGB").save(tmp_path / image)
    elif case == "camera mpo":
        image = "photo.jpg"
        Image.open(first).convert("RGB").save(tmp_path / image, "MPO", save_all=True,
                                              append_images=[Image.open(first).convert("RGB")])
    elif case == "turned tiff":  # stored lying on its side, orientation 8: read upright, 400 x 100 as the file says
        image = "turned.tif"
        stored, tags = Image.open(first).transpose(Image.Transpose.ROTATE_270), Image.Exif()
        tags[0x0112] = 8
        stored.save(tmp_path / image, exif=tags)
    elif case == "turned":  # as the job's export of a page it turned says so
        turn = ('<Metadata><MetadataItem type="processingStep" name="preprocessing/optimization/deskewing" '
                'value="trocr-pipeline"><Labels><Label type="rotation" value="180"/></Labels></MetadataItem>'
                '</Metadata>')
    else:
        size = 'imageWidth="800" imageHeight="200"'
    (tmp_path / "page.xml").write_text(f"""<?xml version="1.0" encoding="UTF-8"?>
<PcGts xmlns="http://schema.primaresearch.org/PAGE/gts/pagecontent/2019-07-15">{turn}
  <Page imageFilename="{image}" {size}><TextRegion id="r1">
    <TextLine id="l1"><Coords points="5,3 200,3 200,40 5,40"/><TextEquiv><Unicode>first line</Unicode></TextEquiv>
    </TextLine></TextRegion></Page></PcGts>""")
    said = {"two-page tiff": "an image of 2 pages, and does not say which; export with mets",
            "pdf": "names a PDF", "turned": "turned 180 degrees clockwise, not of the image",
            "other size": "describes a 800x200 px page, and its image .* is 400x100 px as read"}.get(case)
    if said is None:
        assert [line.text for line in read_page_lines(tmp_path / "page.xml")] == ["first line"]
        assert read_page_truth([tmp_path / "page.xml"])[0].text == "first line"
        return
    with pytest.raises(ConfigError, match=said):
        read_page_lines(tmp_path / "page.xml")
    if case in ("turned", "other size"):
        assert read_page_truth([tmp_path / "page.xml"])[0].text == "first line"
    else:
        with pytest.raises(ConfigError, match=said):
            read_page_truth([tmp_path / "page.xml"])


def test_alto_lines_use_polygon_or_box_and_join_strings(tmp_path):
    page_image(tmp_path)
    (tmp_path / "page.xml").write_text("""<?xml version="1.0" encoding="UTF-8"?>
<alto xmlns="http://www.loc.gov/standards/alto/ns-v4#">
  <Description><MeasurementUnit>pixel</MeasurementUnit>
    <sourceImageInformation><fileName>page.png</fileName></sourceImageInformation></Description>
  <Layout><Page><PrintSpace><TextBlock>
    <TextLine HPOS="5" VPOS="3" WIDTH="195" HEIGHT="37"><String CONTENT="first"/><SP/><String CONTENT="li"/>
      <HYP CONTENT="-"/></TextLine>
    <TextLine><Shape><Polygon POINTS="5 52 220 52 220 90 5 90"/></Shape><String CONTENT="second line">
      <Shape><Polygon POINTS="150 52 220 52 220 90 150 90"/></Shape></String></TextLine>
  </TextBlock></PrintSpace></Page></Layout></alto>""")
    # a line-end hyphen is text; a line's outline is its own Shape, not its last word's
    lines = read_page_lines(tmp_path / "page.xml")
    assert [line.text for line in lines] == ["first li-", "second line"]
    second = lines[1].load_gray()
    assert second.shape[1] == 216 and second.shape[0] < 39


def test_cut_polygon_whitens_outside_and_rejects_degenerate_shapes():
    gray = np.zeros((20, 20), dtype=np.uint8)
    triangle = cut_polygon(gray, np.array([[0, 0], [19, 0], [0, 19]], dtype=float))
    assert triangle[0, 0] == 0 and triangle[19, 19] == 255
    assert cut_polygon(gray, np.array([[0, 0], [5, 5]], dtype=float)) is None


def test_missing_line_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_line_folder(tmp_path / "nope")


def test_shipped_training_configs_rebuild_each_bundled_model_from_scratch():
    # the model cards give these files as the commands that rebuild the bundled models, stage by stage
    root = Path(__file__).resolve().parent.parent
    configs = {path.name: load_train_config(path) for path in sorted((root / "configs").glob("train-*.yaml"))}
    outputs = [str(config.output_dir) for config in configs.values()]
    assert len(outputs) == len(set(outputs)), "two configs write the same folder"
    for name, config in configs.items():
        assert config.base_model is None or config.base_model in outputs, f"{name}: nothing builds {config.base_model}"
    bundled = sorted(f"models/{folder.name}" for folder in (root / "models").iterdir() if folder.is_dir())
    assert sorted(output for output in outputs if output.startswith("models/")) == bundled
    # a new run into a folder holding a model is refused unless the config says the model there is to be replaced
    assert [name for name, config in configs.items() if str(config.output_dir).startswith("models/")
            and not config.replace_output] == []


def test_validation_cer_is_scored_as_eval_scores_it():
    """Training's validation CER after eval's normalisation: a double space or a decomposed accent in the ground
    truth is no error of the model's (they had put 1-12 points between the two figures for the same model)."""
    normalize = make_normalizer(())
    assert corpus_error_rates(["a  b", "e\u0301t\u00e9"], ["a b", "\u00e9te\u0301"], normalize)[1] == 0.0
    assert corpus_error_rates(["ab", " "], ["a", "x"], normalize)[:2] == (1, 0.5)  # an empty reference is not scored


def test_an_unfinished_checkpoint_never_takes_a_complete_ones_place_and_resume_needs_one(tmp_path, base_model,
                                                                                          line_folder):
    """A run killed while saving leaves an unfinished checkpoint: it had counted as one of keep_checkpoints, so
    with 1 the next save removed every complete checkpoint; the next --resume then started over from the base
    model with a warning, and its first validation replaced the best model in output_dir."""
    config = fine_tune_config(tmp_path, base_model, line_folder, steps=10).model_copy(update={"keep_checkpoints": 1})
    train(config, show_progress=False)
    unfinished = tmp_path / "work" / f"{CHECKPOINT_PREFIX}20"
    shutil.copytree(tmp_path / "work" / f"{CHECKPOINT_PREFIX}10", unfinished)
    (unfinished / TRAINER_STATE).unlink()
    train(config.model_copy(update={"steps": 12}), resume=True, show_progress=False)
    assert sorted(path.name for path in (tmp_path / "work").glob(f"{CHECKPOINT_PREFIX}*")) == [f"{CHECKPOINT_PREFIX}12"]
    assert latest_checkpoint(tmp_path / "work").name == f"{CHECKPOINT_PREFIX}12"
    best = (tmp_path / "model" / "model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "work")
    with pytest.raises(ConfigError, match="--resume: .* holds no complete checkpoint to continue from"):
        train(config.model_copy(update={"steps": 14}), resume=True, show_progress=False)
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == best
    # a refused run leaves nothing it made (a work_dir mistyped with --resume had been made, and an empty output_dir)
    assert not (tmp_path / "work").exists()
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        train(config.model_copy(update={"work_dir": tmp_path / "typo", "output_dir": tmp_path / "new-model"}),
              resume=True, show_progress=False)
    assert not (tmp_path / "typo").exists() and not (tmp_path / "new-model").exists()


def test_a_work_dir_belongs_to_one_run(tmp_path, base_model, line_folder, caplog):
    """A run without --resume in a work_dir with checkpoints had rotated its own checkpoints away by step number,
    so that --resume later continued the other run; a resume under other data or optimizer settings had mixed
    the two silently; a backup named checkpoint-N.bak had crashed the run."""
    config = fine_tune_config(tmp_path, base_model, line_folder, steps=10)
    train(config, show_progress=False)
    (tmp_path / "work" / f"{CHECKPOINT_PREFIX}10.bak").mkdir()
    with pytest.raises(ConfigError, match=f"holds the checkpoints of an earlier run \\(the newest: {CHECKPOINT_PREFIX}10\\)"):
        train(config, show_progress=False)
    with pytest.raises(ConfigError, match="saved with other learning_rate, train_data than this config gives"):
        train(config.model_copy(update={"learning_rate": 1e-4, "train_data": config.validation_data * 2}),
              resume=True, show_progress=False)
    # a better model saved after the newest checkpoint (step 10's is its own here) is replaced only by a better one
    (tmp_path / "work" / BEST_STATE).write_text(json.dumps({"step": 15, "validation_cer": 0.0001}))
    _, state = start_run(config.model_copy(update={"steps": 20}), resume=True)
    assert (state.step, state.best_cer) == (10, 0.0001)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_device_the_machine_lacks_is_refused_before_any_folder_is_made(tmp_path, base_model, line_folder):
    """The work_dir's hold had made work_dir (and its lock file) before the device and precision were checked."""
    config = fine_tune_config(tmp_path, base_model, line_folder, steps=2).model_copy(update={"device": "cuda"})
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        train(config, show_progress=False)
    assert not (tmp_path / "work").exists() and not (tmp_path / "model").exists()


def test_a_work_dir_takes_one_run_at_a_time(tmp_path, base_model, line_folder):
    """A --resume started while a background run still trained on the same work_dir had trained beside it: both wrote
    checkpoints of the same steps into the same folders, rotated away each other's and replaced each other's best
    model in output_dir."""
    config = fine_tune_config(tmp_path, base_model, line_folder, steps=2)
    train(config, show_progress=False)
    background = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; lock = open(sys.argv[1], 'a+'); "
                                   "fcntl.flock(lock, fcntl.LOCK_EX); lock.truncate(0); lock.write('4242'); lock.flush(); print(flush=True); "
                                   "time.sleep(60)", str(tmp_path / "work" / RUN_LOCK)], stdout=subprocess.PIPE)
    try:
        background.stdout.readline()  # the other process holds work_dir
        with pytest.raises(OutputLocked, match=r"work is in use by another training run \(process 4242\)"):
            train(config.model_copy(update={"steps": 4}), resume=True, show_progress=False)
    finally:
        background.kill()
        background.wait()
    assert latest_checkpoint(tmp_path / "work").name == f"{CHECKPOINT_PREFIX}2"
    metrics: list[dict] = []  # the other process gone, its hold goes with it; and a run ended lets go of it
    train(config.model_copy(update={"steps": 3}), resume=True, show_progress=False, report=metrics.append)
    train(config.model_copy(update={"steps": 4}), resume=True, show_progress=False, report=metrics.append)
    assert [row["step"] for row in metrics] == [3, 4]
    # an output_dir takes one run at a time too, whatever its work_dir (two had each saved their best models there)
    with holding_work_dir(config):
        with pytest.raises(OutputLocked, match="model is the output_dir of another training run"):
            train(config.model_copy(update={"work_dir": tmp_path / "work-2"}), show_progress=False)


def test_a_resume_into_another_or_an_emptied_output_dir_saves_its_best_model_there(tmp_path, base_model,
                                                                                  line_folder):
    """The CER of the model in the first output_dir had been kept: nothing was saved into the new one unless a model
    beat it, and the run ended with "model saved to" a folder it had left empty."""
    config = fine_tune_config(tmp_path, base_model, line_folder, steps=10)
    train(config, show_progress=False)
    (tmp_path / "work" / BEST_STATE).write_text(json.dumps(  # a perfect model in the first output_dir
        {"step": 10, "validation_cer": 0.0, "output_dir": os.path.abspath(tmp_path / "model")}))
    moved = config.model_copy(update={"steps": 11, "output_dir": tmp_path / "model-2"})
    assert load_trocr(str(train(moved, resume=True, show_progress=False)), device="cpu")
    shutil.rmtree(tmp_path / "model-2")
    assert load_trocr(str(train(moved.model_copy(update={"steps": 12}), resume=True, show_progress=False)),
                      device="cpu")
    best = json.loads((tmp_path / "work" / BEST_STATE).read_text())
    (tmp_path / "work" / BEST_STATE).write_text(json.dumps({**best, "validation_cer": 0.0}))
    _, state = start_run(moved.model_copy(update={"steps": 13}), resume=True)  # the same folder: its model's CER holds
    assert state.best_cer == 0.0
    # no step left and no model there: refused (it had said "model saved to" the empty folder)
    with pytest.raises(ConfigError, match=r"is at step 12 already, and this run stops at step 12: no step is left"):
        train(moved.model_copy(update={"steps": 12, "output_dir": tmp_path / "model-3"}), resume=True,
              show_progress=False)
    assert not (tmp_path / "model-3").exists()  # nothing was saved there: the folder is not left either


def test_a_resume_with_no_step_left_is_refused(tmp_path, base_model, line_folder, capsys):
    """With the best model in output_dir, a resume at or past its last step had trained and saved nothing, and said
    "model saved to" with exit 0."""
    config = fine_tune_config(tmp_path, base_model, line_folder, steps=10)
    train(config, show_progress=False)
    best = (tmp_path / "model" / "model.safetensors").read_bytes()
    for steps in (10, 8):
        (tmp_path / "train.yaml").write_text(yaml.safe_dump(config.model_copy(update={"steps": steps})
                                                            .model_dump(mode="json")))
        assert main(["train", "--config", str(tmp_path / "train.yaml"), "--resume", "--no-progress"]) == ExitCode.bad_args
        refused = capsys.readouterr()
        assert f"is at step 10 already, and this run stops at step {steps}: no step is left" in refused.err
        assert "model saved to" not in refused.out
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == best
    assert latest_checkpoint(tmp_path / "work").name == f"{CHECKPOINT_PREFIX}10"
    # without validation the model is saved at the run's end, after its last checkpoint: where that save failed (a full
    # disk), the resume the message advises saves it (it had been refused, the run's model nowhere but the checkpoint)
    unvalidated = config.model_copy(update={"validation_data": [], "work_dir": tmp_path / "work2",
                                            "output_dir": tmp_path / "model2"})
    train(unvalidated, show_progress=False)
    shutil.rmtree(tmp_path / "model2")
    train(unvalidated, resume=True, show_progress=False)
    assert load_trocr(str(tmp_path / "model2"), device="cpu").model is not None


def test_a_resume_naming_its_output_dir_through_a_link_keeps_the_cer_of_the_model_there(tmp_path, base_model,
                                                                                       line_folder):
    """best.json names output_dir as the run spelt it (resolved, with ``--workers N``): the same folder named through a
    link had been taken for another, and its better model replaced by the resumed run's first validated one."""
    config = fine_tune_config(tmp_path, base_model, line_folder, steps=10)
    train(config, show_progress=False)
    best = json.loads((tmp_path / "work" / BEST_STATE).read_text())
    (tmp_path / "work" / BEST_STATE).write_text(json.dumps({**best, "validation_cer": 0.0}))
    (tmp_path / "link").symlink_to(tmp_path)
    _, state = start_run(config.model_copy(update={"steps": 11, "output_dir": tmp_path / "link" / "model"}),
                         resume=True)
    assert state.best_cer == 0.0


def test_storage_that_cannot_take_a_checkpoint_stops_training_with_one_line(tmp_path, base_model, line_folder,
                                                                            small_disk):
    """A full disk had ended the run in a torch traceback naming no file, a read-only one only at the first
    checkpoint, hundreds of steps in. At the first checkpoint it had left that checkpoint's folder half written and
    told to continue with --resume, which found no checkpoint to continue from."""
    config = fine_tune_config(small_disk, base_model, line_folder, steps=2).model_copy(
        update={"output_dir": tmp_path / "model", "checkpoint_every": 1, "validate_every": 1})
    (small_disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 64 * 1024))
    with pytest.raises(WriteFailed, match=f"cannot write {small_disk / 'work' / CHECKPOINT_PREFIX}1: no space left on "
                                          "the device; no checkpoint was saved before it: free space and start the "
                                          "run again \\(without --resume\\)"):
        train(config, show_progress=False)
    assert not list((small_disk / "work").glob(f"{CHECKPOINT_PREFIX}*"))
    (small_disk / "filler").unlink()
    train(config, show_progress=False)  # as it says (over the model its step 1 saved in output_dir)
    (small_disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 64 * 1024))
    with pytest.raises(WriteFailed, match=f"{CHECKPOINT_PREFIX}3: no space left on the device; the checkpoints saved "
                                          f"before it are kept \\(the newest: {CHECKPOINT_PREFIX}2\\): free space and "
                                          "continue with --resume"):
        train(config.model_copy(update={"steps": 3}), resume=True, show_progress=False)
    assert sorted(path.name for path in (small_disk / "work").glob(f"{CHECKPOINT_PREFIX}*")) == [
        f"{CHECKPOINT_PREFIX}1", f"{CHECKPOINT_PREFIX}2"]
    (small_disk / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(OutputNotWritable, match=f"training cannot write to {small_disk / 'work'}"):
        train(config, show_progress=False)


def test_a_disk_that_fills_while_the_trainer_state_is_written_is_named_full(tmp_path, base_model, line_folder,
                                                                            small_disk):
    """torch's writer reports a short write as "unexpected pos N vs M", which had been passed on as it was."""
    config = fine_tune_config(small_disk, base_model, line_folder, steps=1).model_copy(
        update={"output_dir": tmp_path / "model", "checkpoint_every": 1})
    model_files = sum(path.stat().st_size for path in base_model.iterdir())
    (small_disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - model_files - 160 * 1024))
    with pytest.raises(WriteFailed, match=f"cannot write {small_disk / 'work' / CHECKPOINT_PREFIX}1: no space left") as failed:
        train(config, show_progress=False)
    assert "unexpected pos" in str(failed.value.__cause__)  # the state failed, the weights were written


def test_loader_workers_end_with_a_training_process_killed_outright(tmp_path, base_model, line_folder):
    """SIGKILL (the out-of-memory killer) gives no chance to unwind: a loader worker had been left blocked on the
    dead process's pipe for good, holding its memory."""
    config = fine_tune_config(tmp_path, base_model, line_folder, steps=100_000).model_dump(mode="json")
    config.update(loader_workers=1, checkpoint_every=100_000, validate_every=100_000)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    training = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", "--config", str(tmp_path / "train.yaml"),
                                 "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children_file = Path(f"/proc/{training.pid}/task/{training.pid}/children")
    deadline = time.monotonic() + 120
    while not children_file.read_text().split() and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = children_file.read_text().split()
    assert workers, "the loader worker never started"
    time.sleep(2)  # the worker is making batches
    training.kill()
    training.wait()

    def alive(pid: str) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 20
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(alive, workers))


def test_a_resumed_run_continues_the_synthetic_lines_where_the_last_run_stopped():
    """It had started again at the beginning of a 256-line chunk: up to a chunk of lines trained on twice."""
    from pipeline.synth.lines import iter_lines
    from pipeline.train.data import _synth_stream

    source = DataSource(kind="synth", seed=5)
    _, text = next(_synth_stream(source, 260, worker_id=0, workers=1))
    assert text == next(iter_lines(1, 5, start_index=260))[1]
    _, text = next(_synth_stream(source, 260, worker_id=1, workers=2))  # the next worker's chunk, whole
    assert text == next(iter_lines(1, 5, start_index=512))[1]


def test_a_model_is_saved_onto_a_mount_point_and_a_killed_save_leaves_nothing_behind(tmp_path, base_model,
                                                                                   line_folder, small_disk):
    """Staged beside the folder, the files had crossed a mount point (output_dir a volume of its own: exit 7)."""
    (small_disk / f"{SAVING_PREFIX}killed").mkdir()  # what a save killed half way leaves
    config = fine_tune_config(tmp_path, base_model, line_folder, steps=2).model_copy(update={"output_dir": small_disk})
    train(config, show_progress=False)
    assert load_trocr(str(small_disk), device="cpu") and not list(small_disk.glob(f"{SAVING_PREFIX}*"))


def test_a_resume_reads_the_same_folders_however_they_are_written(tmp_path, base_model, line_folder, monkeypatch):
    """A relative data path run from another folder had been refused as other settings; a base_model folder is
    compared so too."""
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    relative = Path(os.path.relpath(line_folder))
    config = fine_tune_config(tmp_path, Path(os.path.relpath(base_model)), relative, steps=10)
    train(config, show_progress=False)
    monkeypatch.chdir(tmp_path)
    moved = config.model_copy(update={
        "steps": 12, "base_model": os.path.relpath(base_model),
        "train_data": [DataSource(kind="folder", path=Path(os.path.relpath(line_folder)))],
        "validation_data": [DataSource(kind="folder", path=Path(os.path.relpath(line_folder)))]})
    metrics: list[dict] = []
    train(moved, resume=True, show_progress=False, report=metrics.append)
    assert [row["step"] for row in metrics] == [11, 12]


def test_a_damaged_newest_checkpoint_is_named_with_the_one_to_resume_from(tmp_path, base_model, line_folder, capsys):
    """A trainer state cut short (a copy of work_dir not yet done, a failing disk) had ended --resume in a torch
    traceback (PytorchStreamReader failed reading zip archive), exit 1."""
    config = fine_tune_config(tmp_path, base_model, line_folder, steps=4).model_copy(
        update={"checkpoint_every": 2, "validate_every": 2})
    train(config, show_progress=False)
    state = tmp_path / "work" / f"{CHECKPOINT_PREFIX}4" / TRAINER_STATE
    sound = state.read_bytes()
    state.unlink()
    # a read the kernel fails (EIO: this process's unmapped address 0) is the disk's error, said as it is, and no
    # advice to remove a checkpoint that may be sound
    state.symlink_to("/proc/self/mem")
    with pytest.raises(ModelLoadError, match=f"--resume: cannot read the newest checkpoint {state.parent}: .*Input/"
                                             "output error") as refused:
        train(config.model_copy(update={"steps": 6}), resume=True, show_progress=False)
    assert "remove" not in str(refused.value)
    state.unlink()
    state.write_bytes(sound[:1000])
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config.model_copy(update={"steps": 6}).model_dump(mode="json")))
    assert main(["train", "--config", str(tmp_path / "train.yaml"), "--resume", "--no-progress"]) == ExitCode.model_error
    refused = capsys.readouterr().err
    assert (f"the newest checkpoint {state.parent} cannot be read (its {TRAINER_STATE} is cut short or damaged): "
            f"remove {CHECKPOINT_PREFIX}4 to resume from {CHECKPOINT_PREFIX}2") in refused and "Traceback" not in refused
    shutil.rmtree(state.parent)  # as it says
    metrics: list[dict] = []
    train(config.model_copy(update={"steps": 3}), resume=True, show_progress=False, report=metrics.append)
    assert [row["step"] for row in metrics] == [3]
    shutil.rmtree(tmp_path / "work" / f"{CHECKPOINT_PREFIX}2")
    weights = tmp_path / "work" / f"{CHECKPOINT_PREFIX}3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # damaged weights, and no older checkpoint
    with pytest.raises(ModelLoadError, match=f"{CHECKPOINT_PREFIX}3 cannot be read \\(cannot load TrOCR model .*: no "
                                             "complete checkpoint is older: remove it, and start the run again"):
        train(config.model_copy(update={"steps": 6}), resume=True, show_progress=False)


def test_a_resume_under_another_base_model_is_refused(tmp_path, base_model, line_folder):
    """A resume under another base_model had been taken without a word (the model comes from the checkpoint), though
    the config said another model was trained. A base folder gone from here is not read on resume, and a checkpoint
    saved before the base was recorded is taken as it is."""
    base = tmp_path / "base"
    shutil.copytree(base_model, base)
    config = fine_tune_config(tmp_path, base, line_folder, steps=2).model_copy(update={"checkpoint_every": 1})
    train(config, show_progress=False)
    with pytest.raises(ConfigError, match=re.escape("saved with other base_model than this config gives; only ") + ".*"
                       + re.escape(f"give the one the checkpoint was saved with ({base}) even where that folder is gone")):
        train(config.model_copy(update={"steps": 3, "base_model": str(base_model)}), resume=True, show_progress=False)
    base.rename(tmp_path / "moved-away")
    metrics: list[dict] = []
    train(config.model_copy(update={"steps": 3}), resume=True, show_progress=False, report=metrics.append)
    state = latest_checkpoint(tmp_path / "work") / TRAINER_STATE
    saved = torch.load(state, weights_only=False)
    saved["settings"] = {key: value for key, value in saved["settings"].items()
                         if key not in UNREAD_ON_RESUME}
    torch.save(saved, state)
    train(config.model_copy(update={"steps": 4, "base_model": str(base_model)}), resume=True, show_progress=False,
          report=metrics.append)
    assert [row["step"] for row in metrics] == [3, 4]


def test_a_new_run_replaces_a_model_in_output_dir_only_when_told_to(tmp_path, base_model, line_folder, capsys):
    """A new run into a folder holding a model (a copy of a bundled one, its own base_model) had trained over it without
    a word, keeping the old model's card (README.md) beside the new model."""
    output = tmp_path / "model"
    shutil.copytree(base_model, output)
    (output / "README.md").write_text("# the base model's card\n")
    weights = (output / "model.safetensors").read_bytes()
    config = fine_tune_config(tmp_path, output, line_folder, steps=2).model_copy(
        update={"checkpoint_every": 1, "validation_data": []})  # no validation: each run saves its last model
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    assert main(["train", "--config", str(tmp_path / "train.yaml"), "--no-progress"]) == ExitCode.bad_args
    assert (f"{output} holds a model already, which this new run would replace: set replace_output: true in the "
            "config to replace it") in capsys.readouterr().err
    assert (output / "model.safetensors").read_bytes() == weights and (output / "README.md").is_file()
    assert not (tmp_path / "work").exists()
    replacing = config.model_copy(update={"replace_output": True})  # output_dir is base_model too
    train(replacing, show_progress=False)
    assert (output / "model.safetensors").read_bytes() != weights and not (output / "README.md").exists()
    (output / "README.md").write_text("# the card of this run's model at step 2\n")
    metrics: list[dict] = []  # the same run resumed, its best model in output_dir: without replace_output too
    train(config.model_copy(update={"steps": 3}), resume=True, show_progress=False, report=metrics.append)
    assert [row["step"] for row in metrics] == [3] and load_trocr(str(output), device="cpu")
    assert not (output / "README.md").exists()  # it described the model of step 2, replaced at step 3


def test_train_help_names_every_key_of_a_training_config(capsys):
    """The YAML's keys, source kinds among them, had been described only in pipeline/train/config.py."""
    from pipeline.train.config import ModelSpec

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = capsys.readouterr().out
    for model in (TrainConfig, DataSource, ModelSpec, LayerSelection):
        for name in model.model_fields:
            assert re.search(rf"^  {name}: ", shown, re.MULTILINE), name
    assert "  kind: 'folder' | 'pages' | 'synth', required" in shown
