"""Data-parallel training with Ray Train: every worker runs the same loop on its own shard of the data."""

from __future__ import annotations

from pathlib import Path

from operators.model import resolve_device
from pipeline.train.config import DataSource, TrainConfig
from pipeline.train.loop import train


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
