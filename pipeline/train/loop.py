"""Train a TrOCR line recognizer from scratch, or fine-tune a checkpoint, on labelled line images.

Teacher forcing: labels are the tokenized text (padding -> -100); the model shifts them right behind
``decoder_start_token_id`` to build the decoder input and returns the token cross-entropy. The
output folder is a ``save_pretrained`` checkpoint (model + processor) that :func:`load_trocr` reads;
it always holds the model with the best validation CER so far, so a usable model exists at any time.
Checkpoints with optimizer state go to ``work_dir`` and ``--resume`` continues from the newest one.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from torch.utils.data import DataLoader
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import TrOCRProcessor, VisionEncoderDecoderModel
from transformers.models.vision_encoder_decoder.modeling_vision_encoder_decoder import shift_tokens_right

from operators.decoding import encode_lines, ink_width_step
from operators.errors import ConfigError, ModelLoadError, OutputLocked, OutputNotWritable, WriteFailed
from operators.model import TrOCRBundle, cpu_has_native_bf16, load_trocr, resolve_device, resolve_dtype
from operators.preprocess import WIDTH_SCALE_KEY, LinePreprocessor, ink_columns
from operators.recognize import LineRecognizer, resolve_max_new_tokens
from operators.storage import holding_lock_file, lock_alone, on_disk, replace_on_disk
from operators.text import make_normalizer
from pipeline.progress import PeriodicProgress
from pipeline.scoring import corpus_error_rates
from pipeline.train.config import TrainConfig
from pipeline.train.data import (Batch, LabelCollator, LabeledLine, TrainingLines, check_training_lines,
                                 validation_lines)
from pipeline.train.model import build_trocr, save_trocr, shrink_trocr
from pipeline.train.tokenizer import train_tokenizer

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")
TRAINER_STATE = "trainer_state.pt"
#: In work_dir: the validation CER of the model in output_dir, so that a resumed run, which restarts from a
#: checkpoint older than that model, replaces it only with a better one.
BEST_STATE = "best.json"
#: In output_dir: the card of the model there (Hugging Face's convention), written by a person, never by training.
MODEL_CARD = "README.md"
#: What torch says of a checkpoint file cut short or damaged (its zip archive).
DAMAGED_ARCHIVE_SIGNS = ("PytorchStreamReader", "zip archive", "central directory")
#: In work_dir: locked (flock) by the run training there, and holding its process id.
RUN_LOCK = "run.lock"
#: What a resumed run may change: how long it runs, and how it saves, validates and uses the machine. The other
#: settings decide what is learnt (data, model, optimizer), so a checkpoint continues only the run that made it.
CHANGEABLE_ON_RESUME = frozenset({"output_dir", "replace_output", "work_dir", "steps", "stop_after_step",
                                  "checkpoint_every", "keep_checkpoints", "validate_every", "validation_batch_size",
                                  "torch_threads", "loader_workers", "device", "precision"})
#: What a resumed run does not read (the model comes from the checkpoint), compared all the same: it says which model
#: the run trains, and a resume under another base_model had been taken without a word.
UNREAD_ON_RESUME = frozenset({"base_model", "model", "base_layers"})
#: Training lines are drawn this many batches at a time and batched by ink width within the draw.
WIDTH_POOL_BATCHES = 8


def build_or_load(config: TrainConfig) -> tuple[VisionEncoderDecoderModel, TrOCRProcessor]:
    """Fine-tune: load base_model (only its ``base_layers``, if given). From scratch: train the tokenizer on
    the synthetic corpus, build the model."""
    if config.base_model is not None:
        bundle = load_trocr(config.base_model, device="cpu")
        if config.base_layers is None:
            return bundle.model, bundle.processor
        return shrink_trocr(bundle.model, config.base_layers.encoder, config.base_layers.decoder), bundle.processor
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


@dataclass
class TrainerState:
    step: int = 0
    best_cer: float = float("inf")


def _checkpoints(work_dir: Path) -> list[Path]:
    """Checkpoint folders in step order (``checkpoint-N``; a copy named otherwise, ``checkpoint-30.bak``, is not one)."""
    steps = {path: int(match[1]) for path in work_dir.glob(f"{CHECKPOINT_PREFIX}*")
             if (match := _CHECKPOINT_NAME.fullmatch(path.name)) and path.is_dir()}
    return sorted(steps, key=steps.get)


def _complete_checkpoints(work_dir: Path) -> list[Path]:
    """Checkpoints in step order but those interrupted while saving (they have no trainer state yet)."""
    return [path for path in _checkpoints(work_dir) if (path / TRAINER_STATE).is_file()]


def latest_checkpoint(work_dir: Path) -> Path | None:
    """The newest complete checkpoint."""
    complete = _complete_checkpoints(work_dir)
    return complete[-1] if complete else None


def _settings(config: TrainConfig) -> dict:
    """The settings a checkpoint belongs to (all but :data:`CHANGEABLE_ON_RESUME`), data and base_model folders as
    absolute paths, so that a relative path run from another folder is the same folder (a hub id stays as it is)."""
    settings = config.model_dump(mode="json", exclude=set(CHANGEABLE_ON_RESUME))
    if config.base_model is not None and os.path.isdir(config.base_model):
        settings["base_model"] = os.path.abspath(config.base_model)
    for key in ("train_data", "validation_data"):
        for source in settings[key]:
            if source.get("path") is not None:
                source["path"] = os.path.abspath(source["path"])
    return settings


@contextmanager
def _saving(what: Path, work_dir: Path) -> Iterator[None]:
    """A failed save (disk full, a folder made read-only) as one line and exit code 7, naming what was saved;
    torch's writer reports a full disk as a RuntimeError (a failed stream, or a short write: "unexpected pos"),
    safetensors as its own error. A full disk says how to go on from the checkpoints in ``work_dir``: before the first
    one, it had told to continue with --resume, which then found none to continue from."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as exc:
        full = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC
                or any(sign in str(exc) for sign in ("iostream error", "No space left", "unexpected pos")))
        if not full:
            raise WriteFailed(f"cannot write {what}: {exc}") from exc
        newest = latest_checkpoint(work_dir)
        then = (f"the checkpoints saved before it are kept (the newest: {newest.name}): free space and continue with "
                "--resume" if newest else "no checkpoint was saved before it: free space and start the run again "
                "(without --resume)")
        raise WriteFailed(f"cannot write {what}: no space left on the device; {then}") from exc


def save_checkpoint(run: "TrainingRun", state: TrainerState) -> Path:
    """Model + processor + optimizer/scheduler/state; the trainer state file is written last (= complete)."""
    folder = run.config.work_dir / f"{CHECKPOINT_PREFIX}{state.step}"
    with _saving(folder, run.config.work_dir):
        try:
            save_trocr(run.model, run.processor, folder)
            partial = folder / f"{TRAINER_STATE}.partial"  # renamed once whole: a run killed while saving leaves none
            torch.save(
                {"step": state.step, "best_cer": state.best_cer, "optimizer": run.optimizer.state_dict(),
                 "schedule": run.schedule.state_dict(), "grad_scaler": run.grad_scaler.state_dict(),
                 "settings": _settings(run.config)},
                partial,
            )
            replace_on_disk(partial, folder / TRAINER_STATE)  # the model's files are on the disk already (save_trocr)
            on_disk(folder)  # before older checkpoints go: a power cut must leave one that is complete
        except BaseException:
            # a failed save (a full disk) had left its folder half written, the only one of a run stopped at its first
            # checkpoint, where --resume then found no checkpoint
            shutil.rmtree(folder, ignore_errors=True)
            raise
    complete, unfinished = [], []
    for checkpoint in _checkpoints(run.config.work_dir):
        (complete if (checkpoint / TRAINER_STATE).is_file() else unfinished).append(checkpoint)
    # only complete ones count as kept: an unfinished one (a run killed while saving it) had taken a place, and with
    # keep_checkpoints 1 left no checkpoint to resume from; unfinished ones are an earlier run's and go too
    for old in complete[: -run.config.keep_checkpoints] + unfinished:
        shutil.rmtree(old)
    return folder


def save_best(run: "TrainingRun", state: TrainerState) -> None:
    """The model to output_dir, then its CER to work_dir (:data:`BEST_STATE`)."""
    config = run.config
    with _saving(config.output_dir, config.work_dir):
        _save_model(run)
        partial = config.work_dir / f"{BEST_STATE}.partial"
        partial.write_text(json.dumps({"step": state.step, "validation_cer": state.best_cer,
                                       "output_dir": os.path.abspath(config.output_dir)}))
        replace_on_disk(partial, config.work_dir / BEST_STATE)


def _save_model(run: "TrainingRun") -> None:
    """The model to output_dir. A model card there goes with the model it was beside: kept, it had described the model
    this run replaced (a retrained bundled model's card had given its base's CER and recipe)."""
    card = run.config.output_dir / MODEL_CARD
    stale = _holds_model(run.config.output_dir) and card.is_file()
    save_trocr(run.model, run.processor, run.config.output_dir)
    if stale:
        card.unlink()
        log.info("removed %s: it described the model this run replaced; write one for the new model", card)


def _holds_model(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _best_in_output_dir(config: TrainConfig, checkpoint_best: float) -> float:
    """The validation CER of the model in output_dir, as :func:`save_best` recorded it (or the checkpoint's, from a
    work_dir without the record); none (inf) where output_dir holds no model, or is not the folder the record names: a
    resume into another output_dir (or after the model was moved away) had kept the CER of a model not there, saved
    nothing unless a model beat it, and ended with "model saved to" a folder it had left empty."""
    if not _holds_model(config.output_dir):
        return float("inf")
    recorded = _recorded_best(config)
    if recorded is None:
        return checkpoint_best
    recorded_cer, saved_to = recorded
    if saved_to is not None and not _same_folder(saved_to, config.output_dir):
        return float("inf")
    return min(checkpoint_best, recorded_cer)


def _recorded_best(config: TrainConfig) -> tuple[float, object] | None:
    """The CER and the output_dir (None in a record older than that) that work_dir's :data:`BEST_STATE` records; None
    where there is no record to read."""
    try:
        best = json.loads((config.work_dir / BEST_STATE).read_text())
        return float(best["validation_cer"]), best.get("output_dir")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _check_output_dir_free(config: TrainConfig) -> None:
    """A new run replaces a model in output_dir only when told to (``replace_output``), or when the run of this
    work_dir saved it (one stopped before its first checkpoint): it had trained over a copy of a bundled model, or its
    own base_model, without a word, keeping the old model's card beside the new model."""
    if config.replace_output or not _holds_model(config.output_dir):
        return
    recorded = _recorded_best(config)
    if recorded is not None and _same_folder(recorded[1], config.output_dir):
        return
    raise ConfigError(f"{config.output_dir} holds a model already, which this new run would replace: set "
                      f"replace_output: true in the config to replace it (its {MODEL_CARD} goes with it), or give "
                      "another output_dir")


def _same_folder(recorded: object, folder: Path) -> bool:
    """Whether the folder best.json names is ``folder``, by what they are, not how they are spelt: ``--workers N``
    records output_dir with its links resolved, and the same folder reached through a link or another mount had been
    taken for another (its better model then replaced by the resumed run's first one)."""
    try:
        return os.path.samefile(recorded, folder)
    except (OSError, TypeError, ValueError):  # gone, or not a path (a hand-edited record)
        return False


def _check_writable(config: TrainConfig) -> None:
    """Fail at the start, not at the first checkpoint hundreds of steps in, when a folder cannot be written."""
    for folder in (config.work_dir, config.output_dir):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise OutputNotWritable(f"training cannot write to {folder}: {exc}") from exc


@contextmanager
def holding_work_dir(config: TrainConfig) -> Iterator[None]:
    """Hold work_dir (made where missing) for this run while the block runs; the kernel lets go when the process
    ends, however it ends. A second run there (a --resume started while a background run still trained) had
    written checkpoints of the same steps into the same folders, one run's weights beside the other's optimizer
    state, rotated away the checkpoint the other was loading, and put each run's models over the other's in
    output_dir. A work_dir held by another run is refused as a held output is (:class:`OutputLocked`); a device or
    precision this machine lacks before work_dir is made."""
    training_autocast_dtype(config.precision, resolve_device(config.device))
    made = [folder for folder in (config.output_dir, config.work_dir) if not os.path.lexists(folder)]
    with ExitStack() as held:
        try:
            lock = held.enter_context(holding_lock_file(config.work_dir / RUN_LOCK,
                                                        f"the training work_dir {config.work_dir}"))
        except BlockingIOError:
            raise OutputLocked(f"{config.work_dir} is in use by another training run (process "
                               f"{_lock_holder(config)}): let it end or stop it first; a work_dir takes one run at a "
                               "time") from None
        except OSError as exc:
            raise OutputNotWritable(f"training cannot write to {config.work_dir}: {exc}") from exc
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        try:
            with _holding_output_dir(config):
                yield
        finally:
            _leave_no_trace(config, made)


def _lock_holder(config: TrainConfig) -> str:
    """The process id a training run wrote into the work_dir's lock it holds."""
    try:
        return (config.work_dir / RUN_LOCK).read_text().strip() or "?"
    except OSError:
        return "?"


def _leave_no_trace(config: TrainConfig, made: Sequence[Path]) -> None:
    """Take out the lock of a run that wrote nothing (refused: a --resume with no checkpoint, a data folder that is
    not there), and the folders it made, while they are empty: they had been left, an empty output_dir among them."""
    with suppress(OSError):  # written in, or gone: what is left is harmless
        if os.listdir(config.work_dir) == [RUN_LOCK]:
            (config.work_dir / RUN_LOCK).unlink()
    for folder in made:  # each while it is empty (a resume with no step left makes an output_dir and saves nothing)
        with suppress(OSError):
            folder.rmdir()


@contextmanager
def _holding_output_dir(config: TrainConfig) -> Iterator[None]:
    """Hold output_dir too, by a lock on the folder itself (no file in the model's folder): two runs of different
    work_dirs writing their best models into one output_dir had each recorded it as holding its own."""
    try:
        config.output_dir.mkdir(parents=True, exist_ok=True)
        folder = os.open(config.output_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise OutputNotWritable(f"training cannot write to {config.output_dir}: {exc}") from exc
    try:
        try:
            lock_alone(folder, f"the training output_dir {config.output_dir}")
        except BlockingIOError:
            raise OutputLocked(f"{config.output_dir} is the output_dir of another training run (of another work_dir): "
                               "let it end, or give this run an output_dir of its own") from None
        yield
    finally:
        os.close(folder)


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


def training_autocast_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of training steps (fp32: none). On a CPU only bf16, and only where the CPU multiplies
    bf16 in hardware (AMX, AVX512-BF16): a step there takes about 0.6 of its fp32 time (bench/RESULTS.md);
    elsewhere bf16 would be emulated, slower than fp32."""
    if device.type == "cuda" or precision == "fp32":
        return resolve_dtype(precision, device)
    if precision == "fp16":
        raise ConfigError(f"training precision fp16 is CUDA autocast; use fp32 (or bf16 on a CPU with AMX) on {device}")
    if not cpu_has_native_bf16():
        raise ConfigError("training precision bf16 on a CPU needs native bf16 (AMX or AVX512-BF16), which this CPU "
                          "lacks; use fp32")
    return torch.bfloat16


def start_run(config: TrainConfig, resume: bool, shard: tuple[int, int] = (0, 1),
              wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> tuple[TrainingRun, TrainerState]:
    """Build (or reload) model and optimizer; with ``resume`` continue from the newest checkpoint."""
    device = resolve_device(config.device)
    autocast_dtype = training_autocast_dtype(config.precision, device)
    if shard[0] == 0:
        _check_writable(config)
    return _load_run(config, resume, shard, wrap, device, autocast_dtype)


def _load_run(config: TrainConfig, resume: bool, shard: tuple[int, int],
              wrap: Callable[[torch.nn.Module], torch.nn.Module] | None, device: torch.device,
              autocast_dtype: torch.dtype) -> tuple[TrainingRun, TrainerState]:
    checkpoint = latest_checkpoint(config.work_dir)
    if checkpoint is not None and not resume:
        raise ConfigError(f"{config.work_dir} holds the checkpoints of an earlier run (the newest: {checkpoint.name}): "
                          f"add --resume to continue it, or remove them or set another work_dir to start again")
    if resume and checkpoint is None:  # starting over would put a new run's first model over the best one
        raise ConfigError(f"--resume: {config.work_dir} holds no complete checkpoint to continue from; to start a new "
                          f"run, leave out --resume (and set replace_output: true if its models are to replace one in "
                          f"{config.output_dir})")
    if checkpoint is None and shard[0] == 0:
        _check_output_dir_free(config)
        (config.work_dir / BEST_STATE).unlink(missing_ok=True)  # an earlier run's, killed before its first checkpoint
    if checkpoint is not None:
        with _reading_checkpoint(checkpoint):
            bundle = load_trocr(str(checkpoint), device="cpu")
            # to the CPU: a GPU's own errors (out of memory) are not taken for a damaged file (the optimizer's
            # state goes to its parameters' device as it is loaded)
            saved = torch.load(checkpoint / TRAINER_STATE, map_location="cpu", weights_only=False)
        model, processor = bundle.model, bundle.processor
    else:
        model, processor = build_or_load(config)
        if config.width_scale is not None:
            setattr(processor.image_processor, WIDTH_SCALE_KEY, config.width_scale)
    model.to(device).train()
    forward_model = wrap(InkWidthForward(model)) if wrap else InkWidthForward(model)
    optimizer, schedule = make_optimizer(model, config)
    grad_scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    state = TrainerState()
    if checkpoint is not None:
        _check_same_settings(saved.get("settings"), config, checkpoint)
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        if saved["grad_scaler"]:  # empty from a run without fp16 loss scaling (resumed in fp16 on a GPU)
            grad_scaler.load_state_dict(saved["grad_scaler"])
        state = TrainerState(step=saved["step"], best_cer=_best_in_output_dir(config, saved["best_cer"]))
        log.info("resumed from %s at step %d", checkpoint, state.step)
    preprocessor = LinePreprocessor.from_image_processor(processor.image_processor)
    run = TrainingRun(config, model, processor, optimizer, schedule, device, autocast_dtype, forward_model, preprocessor,
                      grad_scaler, shard)
    return run, state


@contextmanager
def _reading_checkpoint(checkpoint: Path) -> Iterator[None]:
    """A newest checkpoint that cannot be read is named in one line, exit 5, with the checkpoint to resume from once
    it is removed (a trainer state cut short had ended --resume in a torch traceback). It is not passed over by itself:
    a file cut short may be a copy of work_dir still under way, or a failing disk, for a person to look at; and a run
    gone back to the older checkpoint would keep the damaged one as the newest, rotating the good one away."""
    try:
        yield
    except (ModelLoadError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        damaged = (isinstance(exc, (ModelLoadError, EOFError, pickle.UnpicklingError))
                   or isinstance(exc, RuntimeError) and any(sign in str(exc) for sign in DAMAGED_ARCHIVE_SIGNS))
        if not damaged:  # a disk's or a mount's error (EIO, EACCES) is no reason to remove a sound checkpoint
            if isinstance(exc, OSError):
                raise ModelLoadError(f"--resume: cannot read the newest checkpoint {checkpoint}: {exc}") from exc
            raise
        damage = exc if isinstance(exc, ModelLoadError) else f"its {TRAINER_STATE} is cut short or damaged"
        older = _complete_checkpoints(checkpoint.parent)[:-1]
        then = (f"remove {checkpoint.name} to resume from {older[-1].name}, the newest complete one before it" if older
                else "no complete checkpoint is older: remove it, and start the run again without --resume")
        raise ModelLoadError(f"--resume: the newest checkpoint {checkpoint} cannot be read ({damage}): {then}") from exc


def _check_same_settings(saved: dict | None, config: TrainConfig, checkpoint: Path) -> None:
    """Refuse to resume a checkpoint under other data, model or optimizer settings (checkpoints written before
    the settings, or the model's source, were saved with them are taken as they are). A base_model folder gone from
    here is the one it was saved with where the path given leads to where it was: a resume does not read it."""
    if saved is None:
        return
    now = _settings(config)
    if not UNREAD_ON_RESUME & saved.keys():
        now = {key: value for key, value in now.items() if key not in UNREAD_ON_RESUME}
    elif now["base_model"] is not None and saved["base_model"] == os.path.abspath(now["base_model"]):
        now["base_model"] = saved["base_model"]
    changed = sorted(key for key in saved.keys() | now.keys() if saved.get(key) != now.get(key))
    if changed:
        unread = (f"; base_model is not read on resume, so give the one the checkpoint was saved with "
                  f"({saved['base_model']}) even where that folder is gone" if "base_model" in changed else "")
        raise ConfigError(f"--resume: {checkpoint} was saved with other {', '.join(changed)} than this config gives; "
                          f"only {', '.join(sorted(CHANGEABLE_ON_RESUME))} may change on resume (set them back, link a "
                          f"moved data folder at its old path, or start a new run in another work_dir){unread}")


def training_batches(run: TrainingRun, state: TrainerState) -> Iterator[Batch]:
    config = run.config
    lines_seen = state.step * config.batch_size * config.grad_accum_steps * run.shard[1]
    dataset = TrainingLines(config.train_data, run.preprocessor, config.seed, start_line=lines_seen, shard=run.shard)
    pools = DataLoader(dataset, batch_size=config.batch_size * WIDTH_POOL_BATCHES, collate_fn=list,
                       num_workers=config.loader_workers, worker_init_fn=_end_with_the_training_process)
    return _width_sorted_batches(pools, label_collator(run), config.batch_size, random.Random(config.seed + lines_seen))


def label_collator(run: TrainingRun) -> LabelCollator:
    return LabelCollator(run.processor.tokenizer, run.model.config.decoder_start_token_id,
                         run.model.generation_config.max_new_tokens or 128)


#: prctl(2) option: the signal a process gets when the thread that made it ends.
_PR_SET_PDEATHSIG = 1


def _end_with_the_training_process(worker_id: int) -> None:
    """A DataLoader worker ends when the training process dies, even by SIGKILL (the out-of-memory killer):
    otherwise it blocks forever writing a batch to the pipe nobody reads, holding its memory (Linux only)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


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
    run.model.eval()
    recognizer = LineRecognizer(run.bundle(), "fast", num_beams=1,  # built now: its engine takes the weights as they are
                                max_new_tokens=resolve_max_new_tokens(None, run.model),
                                line_batch_size=run.config.validation_batch_size)
    predictions = [reading.text for reading in recognizer.read_images([line.load_gray() for line in lines])]
    run.model.train()
    # scored as eval scores it (NFC, whitespace runs as one space): the two figures for one model had been 1-12
    # points apart
    return corpus_error_rates([line.text for line in lines], predictions, make_normalizer(()))[1]


def train(config: TrainConfig, resume: bool = False, show_progress: bool = True, shard: tuple[int, int] = (0, 1),
          wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
          report: Callable[[dict], None] | None = None, hold_work_dir: bool = True) -> Path:
    """Run training to ``config.last_step``; returns the output folder (best validation CER, else the last model).

    Under Ray Train every worker runs this with its ``shard`` (rank, world size), ``wrap`` = prepare_model
    (DDP) and ``report`` = ray.train.report; only rank 0 validates and writes files, and the driver holds work_dir
    for them (``hold_work_dir`` false: :func:`holding_work_dir`).
    """
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    torch.manual_seed(config.seed)
    with holding_work_dir(config) if shard[0] == 0 and hold_work_dir else nullcontext():
        run, state = start_run(config, resume, shard, wrap)
        return _train_run(run, state, show_progress, report)


def _train_run(run: TrainingRun, state: TrainerState, show_progress: bool,
               report: Callable[[dict], None] | None) -> Path:
    config = run.config
    if (run.is_main and state.step >= config.last_step
            and (config.validation_data or _holds_model(config.output_dir))):
        # a resume with no step left had trained and saved nothing, and said "model saved to" all the same; one without
        # validation whose output_dir lacks the model (the disk full as the run's end saved it) goes on to save it
        raise ConfigError(f"--resume: {config.work_dir} is at step {state.step} already, and this run stops at step "
                          f"{config.last_step}: no step is left to train; raise steps (or stop_after_step) to train on")
    held_out = validation_lines(config.validation_data) if run.is_main else []
    if run.is_main:
        check_training_lines(config.train_data, label_collator(run))
    batches = training_batches(run, state)
    last_step = config.last_step
    show_progress = show_progress and run.is_main
    on_terminal = show_progress and sys.stderr.isatty()
    progress = tqdm(total=last_step, initial=state.step, disable=not on_terminal, desc="train", unit="step")
    # in a log, a line now and then instead of the bar: tqdm's redraws had run together into one ever-growing line
    in_log = PeriodicProgress("training") if show_progress and not on_terminal else None
    if in_log:
        in_log(state.step, last_step)
    recent_losses: list[float] = []
    started = time.monotonic()
    with logging_redirect_tqdm():  # validation lines go above the bar instead of onto it
        while state.step < last_step:
            loss = train_step(run, batches)
            recent_losses = (recent_losses + [loss])[-50:]
            state.step += 1
            progress.update(1)
            # redrawn at the bar's own pace: a redraw each step had filled a log file with a line per step
            progress.set_postfix(loss=f"{np.mean(recent_losses):.3f}", lr=f"{run.schedule.get_last_lr()[0]:.2e}",
                                 refresh=False)
            at_end = state.step == last_step
            if in_log:
                in_log(state.step, last_step, f"step {state.step}/{last_step}, loss {np.mean(recent_losses):.4f}")
            metrics = {"step": state.step, "loss": loss, "world_size": run.shard[1]}
            if held_out and config.is_validation_step(state.step):
                metrics["validation_cer"] = cer = validate(run, held_out)
                log.info("step %d: loss %.4f, validation CER %.4f (best before %.4f), %.0f s%s",
                         state.step, np.mean(recent_losses), cer, state.best_cer, time.monotonic() - started,
                         f", {run.shard[1]} workers" if run.shard[1] > 1 else "")
                if cer < state.best_cer:
                    state.best_cer = cer
                    save_best(run, state)
            if run.is_main and (state.step % config.checkpoint_every == 0 or at_end):
                # also where no bar is shown (--no-progress) and nothing is validated: what the run is doing
                log.info("step %d: loss %.4f, checkpoint %s, %.0f s", state.step, np.mean(recent_losses),
                         save_checkpoint(run, state).name, time.monotonic() - started)
            if report:
                report(metrics)
    progress.close()
    if run.is_main and not config.validation_data:
        with _saving(config.output_dir, config.work_dir):
            _save_model(run)
    return config.output_dir
