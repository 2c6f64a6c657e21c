"""``trocr-pipeline train``: one process, or ``--workers N`` data-parallel Ray Train workers."""

from __future__ import annotations

import argparse
from pathlib import Path

from operators.errors import ConfigError, ExitCode
from pipeline.progress import without_ray_core_logs
from pipeline.train.config import config_reference, load_train_config
from pipeline.train.distributed import train_with_ray
from pipeline.train.loop import train


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = config_reference()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # the reference's lines kept as they are
    parser.add_argument("--config", "-c", type=Path, required=True, help="training YAML (see configs/train-*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in work_dir")
    parser.add_argument("--workers", type=int, default=1, help="N > 1: data-parallel Ray Train with N CPU workers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal, no progress lines in a log (checkpoints and validations are still logged)")


def train_command(args: argparse.Namespace) -> int:
    from pipeline.cli import check_paths_outlive_the_job

    config = load_train_config(args.config)
    check_paths_outlive_the_job([config.output_dir, config.work_dir])
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.workers > 1:
        with without_ray_core_logs():
            output = train_with_ray(config, args.workers, resume=args.resume)
    else:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # a bar per saved checkpoint would break up the step bar
        output = train(config, resume=args.resume, show_progress=not args.no_progress)
    print(f"model saved to {output}")
    return ExitCode.ok
