"""Data-parallel training with Ray Train: every worker runs the same loop on its own shard of the data."""

from __future__ import annotations

import logging
from pathlib import Path

from operators.errors import PipelineError
from operators.model import resolve_device
from pipeline.train.config import DataSource, TrainConfig
from pipeline.train.loop import holding_work_dir, train


def train_with_ray(config: TrainConfig, workers: int, resume: bool = False) -> Path:
    """Data-parallel training on ``workers`` Ray Train workers (DDP over gloo on CPU, NCCL on GPU).

    Starts a private local Ray instance unless the caller already connected to one, so training
    never attaches by accident to another Ray cluster found on the machine. The console gets the
    rank-0 worker's validation lines and Ray Train's warnings, not its per-step reports; a private
    instance logs only errors from Ray's own actors (without a dashboard, Ray Train's placement-group
    cleaner cannot reach the state API and would warn about it every second).
    """
    config = absolute_paths(config)
    with holding_work_dir(config):  # here, so that a work_dir another run holds is refused in one line, exit 6
        return _fit(config, workers, resume)


def _fit(config: TrainConfig, workers: int, resume: bool) -> Path:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address="local", num_cpus=workers + 1, include_dashboard=False, logging_level=logging.ERROR,
                 logging_config=ray.LoggingConfig(log_level="ERROR"))
    try:
        trainer = TorchTrainer(
            _ray_worker_loop,
            train_loop_config={"config": config.model_dump(mode="json"), "resume": resume},
            scaling_config=ray.train.ScalingConfig(num_workers=workers,
                                                   use_gpu=resolve_device(config.device).type == "cuda"),
            run_config=ray.train.RunConfig(name="trocr-train", storage_path=str(config.work_dir / "ray"),
                                           logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        )
        try:
            trainer.fit()
        except ray.train.WorkerGroupError as exc:
            # a worker's refusal (no step left, a damaged checkpoint) is one line with its exit code, as in one
            # process: it had come back as Ray Train's traceback, exit 1
            refusals = [getattr(failure, "cause", failure) for failure in exc.worker_failures.values()]
            refusal = next((failure for failure in refusals if isinstance(failure, PipelineError)), None)
            if refusal is None:
                raise
            raise refusal from None
    finally:
        if started_here:
            ray.shutdown()
    return config.output_dir


def _ray_worker_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # a bar per checkpoint reaches the console as garbage
    # Ray Train sets the workers' root logger to INFO, and logs every ray.train.report() there; this
    # project's own lines (rank 0's validations) stay at INFO
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("pipeline").setLevel(logging.INFO)
    # Ray Train logs a worker's error with its traceback before the driver hears of it, and the driver says it
    # again: a refusal in its one line, any other error in Ray Train's WorkerGroupError with the same traceback
    logging.getLogger("ray.train.v2._internal.util").setLevel(logging.CRITICAL)
    context = ray.train.get_context()
    config = TrainConfig.model_validate(loop_config["config"])

    def report(metrics: dict) -> None:
        # each ray.train.report waits for the controller to collect the last one (it polls every 2 s),
        # so every rank reports on the validation steps only
        if config.is_validation_step(metrics["step"]):
            ray.train.report(metrics)

    train(
        config,
        resume=loop_config["resume"],
        show_progress=False,
        shard=(context.get_world_rank(), context.get_world_size()),
        # find_unused_parameters: the ViT pooler is part of the checkpoint but not of the loss
        wrap=lambda model: ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True}),
        report=report,
        hold_work_dir=False,  # the driver holds it (train_with_ray)
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
