"""Train a TrOCR line recognizer from scratch, or fine-tune a checkpoint, on labelled line images.

Teacher forcing: labels are the tokenized text (padding -> -100); the model shifts them right behind
``decoder_start_token_id`` to build the decoder input and returns the token cross-entropy. The
output folder is a ``save_pretrained`` checkpoint (model + processor) that :func:`load_trocr` reads;
it always holds the model with the best validation CER so far, so a usable model exists at any time.
Checkpoints with optimizer state go to ``work_dir`` and ``--resume`` continues from the newest one.
"""

from __future__ import annotations

import logging
import math
import random
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import jiwer
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import TrOCRProcessor, VisionEncoderDecoderModel
from transformers.models.vision_encoder_decoder.modeling_vision_encoder_decoder import shift_tokens_right

from operators.decoding import encode_lines, ink_width_step
from operators.errors import ConfigError
from operators.model import TrOCRBundle, cpu_has_native_bf16, load_trocr, resolve_device, resolve_dtype
from operators.preprocess import WIDTH_SCALE_KEY, LinePreprocessor, ink_columns
from operators.recognize import LineRecognizer
from pipeline.train.config import TrainConfig
from pipeline.train.data import Batch, LabelCollator, LabeledLine, TrainingLines, validation_lines
from pipeline.train.model import build_trocr, save_trocr, shrink_trocr
from pipeline.train.tokenizer import train_tokenizer

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.pt"
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


def character_error_rate(references: Sequence[str], predictions: Sequence[str]) -> float:
    """Corpus CER (total edits / total reference characters), jiwer."""
    if not references:
        raise ValueError("no reference lines to compute a CER on")
    return float(jiwer.cer(list(references), list(predictions)))


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
    partial = folder / f"{TRAINER_STATE}.partial"  # renamed once whole: a run killed while saving leaves no state
    torch.save(
        {"step": state.step, "best_cer": state.best_cer, "optimizer": run.optimizer.state_dict(),
         "schedule": run.schedule.state_dict(), "grad_scaler": run.grad_scaler.state_dict()},
        partial,
    )
    os.replace(partial, folder / TRAINER_STATE)
    for old in _checkpoints(run.config.work_dir)[: -run.config.keep_checkpoints]:
        shutil.rmtree(old)
    return folder


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
    checkpoint = latest_checkpoint(config.work_dir) if resume else None
    if resume and checkpoint is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch", config.work_dir)
    if checkpoint is not None:
        bundle = load_trocr(str(checkpoint), device="cpu")
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
    run.model.eval()
    recognizer = LineRecognizer(run.bundle(), "fast", num_beams=1,  # built now: its engine takes the weights as they are
                                max_new_tokens=run.model.generation_config.max_new_tokens or 128,
                                line_batch_size=run.config.validation_batch_size)
    predictions = [reading.text for reading in recognizer.read_images([line.load_gray() for line in lines])]
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
    last_step = config.last_step
    progress = tqdm(total=last_step, initial=state.step, disable=not (show_progress and run.is_main), desc="train", unit="step")
    recent_losses: list[float] = []
    started = time.monotonic()
    with logging_redirect_tqdm():  # validation lines go above the bar instead of onto it
        while state.step < last_step:
            loss = train_step(run, batches)
            recent_losses = (recent_losses + [loss])[-50:]
            state.step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{np.mean(recent_losses):.3f}", lr=f"{run.schedule.get_last_lr()[0]:.2e}")
            at_end = state.step == last_step
            metrics = {"step": state.step, "loss": loss, "world_size": run.shard[1]}
            if held_out and config.is_validation_step(state.step):
                metrics["validation_cer"] = cer = validate(run, held_out)
                log.info("step %d: loss %.4f, validation CER %.4f (best before %.4f), %.0f s%s",
                         state.step, np.mean(recent_losses), cer, state.best_cer, time.monotonic() - started,
                         f", {run.shard[1]} workers" if run.shard[1] > 1 else "")
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
