"""Scaling benchmark (project issue 7): where a page's time goes, and pages/s on 1 and 2 cores.

1. Stage costs: every stage function run in this process, one thread, on the same synthetic pages
   (triage, rasterize, layout = line detection, crop = cut + resize line crops, recognize, write =
   reassemble + Parquet): CPU seconds per page per stage (this process plus its poppler children,
   so other load on the machine does not inflate them), the figures to size a cluster's CPUs per
   GPU with, and wall seconds (on a GPU, the recognize row's wall time is the GPU's cost).
2. End to end: ``run_job`` on a private local Ray instance with the process pinned to 1 core,
   then to 2 cores (``--cores``; Ray's workers inherit the affinity, and Ray gets as many CPUs as
   cores, at least 2: one for the recognizer, one for the page stage), for pages/s including Ray's
   start-up, and each count's speed-up over the first.

    .venv/bin/python bench/scaling.py [--documents 4] [--dpi 300] [--model PATH] [--device cuda] [--cores 1 2]
        [--set recognize.concurrency=3 ...]

The model is ``models/trocr-pipeline-printed-small`` when it is there, else a tiny random TrOCR
built on the fly; the table says which (a random model never stops early, so its recognize cost is
set by ``--max-new-tokens`` and only the CPU stages are realistic).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from operators.ingest import triage  # noqa: E402
from operators.model import load_line_preprocessor  # noqa: E402
from operators.rasterize import page_ranges, rasterize  # noqa: E402
from operators.recognize import TrOCRRecognizer  # noqa: E402
from operators.records import DocumentRecord  # noqa: E402
from operators.settings import DEFAULT_MODEL  # noqa: E402
from operators.write import ParquetSink  # noqa: E402
from pipeline.config import JobConfig, load_config  # noqa: E402
from pipeline.job import run_job  # noqa: E402
from pipeline.stages import cut_crops, detect_page  # noqa: E402
from pipeline.synth.docs import write_document_set  # noqa: E402
from tests.helpers import build_tiny_random_trocr  # noqa: E402

STAGES = ("triage", "rasterize", "layout", "crop", "recognize", "write")


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (pdftoppm), user + system."""
    user, system, children_user, children_system, _ = os.times()
    return user + system + children_user + children_system


@dataclass
class StageCosts:
    """CPU and wall seconds spent in each stage over ``pages`` pages and ``lines`` lines."""

    cpu: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    wall: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    pages: int = 0
    lines: int = 0

    @contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        cpu_started, wall_started = cpu_seconds(), time.perf_counter()
        yield
        self.cpu[stage] += cpu_seconds() - cpu_started
        self.wall[stage] += time.perf_counter() - wall_started


def pick_model(requested: str | None, workdir: Path) -> tuple[str, str]:
    """The model to benchmark and how to describe it."""
    if requested:
        return requested, requested
    if DEFAULT_MODEL.is_dir():
        return str(DEFAULT_MODEL), f"{DEFAULT_MODEL.name} (the shipped model)"
    return str(build_tiny_random_trocr(workdir / "tiny-random")), "tiny random TrOCR (shipped model not present)"


def measure_stages(documents: list[Path], config: JobConfig, output: Path) -> StageCosts:
    """Run each stage function directly, one thread, on every page of ``documents``."""
    costs = StageCosts()
    preprocessor = load_line_preprocessor(config.recognize.model)
    recognizer = TrOCRRecognizer(config.recognize)
    sink = ParquetSink(str(output), config.output.parquet_rows_per_file)
    for document in documents:
        with costs.timing("triage"):
            plan = triage(str(document), config.rasterize)
        if plan.error is not None:
            raise RuntimeError(f"benchmark input {document} failed triage: {plan.error}")
        sink.expect(DocumentRecord(plan.doc_id, plan.source, "ok", None, None, plan.num_pages))
        for task in page_ranges([plan], config.rasterize.pages_per_task):
            with costs.timing("rasterize"):
                pages = rasterize(task, config.rasterize)
            for work in [page for page in pages if page.status == "ok"]:
                with costs.timing("layout"):
                    detect_page(work, config.detect)
                with costs.timing("crop"):
                    cut_crops(work, config, preprocessor)
            with costs.timing("recognize"):
                pages = recognizer.recognize_pages(pages)
            with costs.timing("write"):
                for work in pages:
                    sink.add_page(work)
            costs.pages += len(pages)
            costs.lines += sum(len(work.lines) for work in pages)
    with costs.timing("write"):
        sink.close()
    return costs


def run_on_cores(documents: list[Path], config: JobConfig, output: Path, cores: set[int]) -> float:
    """pages/s of the whole job with this process and its Ray workers pinned to ``cores``."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        summary = run_job([str(path) for path in documents], str(output), config)
    finally:
        os.sched_setaffinity(0, before)
    if summary.written.documents_failed:
        raise RuntimeError(f"{summary.written.documents_failed} benchmark documents failed:\n{summary.describe()}")
    return summary.pages_per_second


def stage_table(costs: StageCosts) -> str:
    """Per-page CPU and wall seconds of each stage; the share is of the CPU total."""
    total = sum(costs.cpu.values())
    rows = [f"{'stage':10} {'CPU-s/page':>10} {'wall-s/page':>11} {'share':>6}"]
    for stage in STAGES:
        rows.append(f"{stage:10} {costs.cpu[stage] / costs.pages:10.3f} {costs.wall[stage] / costs.pages:11.3f} "
                    f"{costs.cpu[stage] / total:6.1%}")
    rows.append(f"{'total':10} {total / costs.pages:10.3f} {sum(costs.wall.values()) / costs.pages:11.3f} {1:6.1%}")
    cpu_only = total - costs.cpu["recognize"]
    rows.append(f"CPU stages without recognize: {cpu_only / costs.pages:.3f} core-s/page "
                f"-> one core feeds {costs.pages / cpu_only:.2f} pages/s")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=4, help="synthetic documents (1-3 pages each)")
    parser.add_argument("--dpi", type=int, default=300, help="scan and rasterize resolution")
    parser.add_argument("--model", help="TrOCR folder or hub id (default: shipped model, else tiny random)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: fp16 with one GPU per recognizer actor, as configs/cluster-v100.yaml")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cores", type=int, nargs="+", default=[1, 2], help="core counts to run the whole job on")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable), e.g. recognize.concurrency=3 for more recognizer actors")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    available = sorted(os.sched_getaffinity(0))
    if max(args.cores) > len(available) or min(args.cores) < 1:
        print(f"--cores {' '.join(map(str, args.cores))}: this process may use 1 to {len(available)} cores",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="scaling-") as scratch:
        workdir = Path(scratch)
        model, model_name = pick_model(args.model, workdir)
        documents = write_document_set(workdir / "docs", args.documents, args.seed, dpi=args.dpi,
                                       formats=("pdf",))
        gpu = ["recognize.precision=fp16", "recognize.num_gpus=1"] if args.device == "cuda" else []
        overrides = [f"rasterize.dpi={args.dpi}", f"recognize.model={model}", f"recognize.device={args.device}",
                     f"recognize.max_new_tokens={args.max_new_tokens}", "recognize.torch_threads=1",
                     *gpu, *args.overrides]
        config = load_config(None, overrides)
        torch.set_num_threads(1)
        costs = measure_stages(documents, config, workdir / "stages")
        print(f"model: {model_name}; {args.documents} documents, {costs.pages} pages, {costs.lines} lines "
              f"at {args.dpi} dpi; max_new_tokens {args.max_new_tokens}; load average {os.getloadavg()[0]:.1f}")
        print(f"\nstage costs, one thread in-process:\n{stage_table(costs)}")
        print("\nwhole job (run_job, local Ray, start-up included):")
        speeds: list[float] = []
        for count in args.cores:
            on_cores = load_config(None, [*overrides, f"ray.num_cpus={max(2, count)}"])
            speeds.append(run_on_cores(documents, on_cores, workdir / f"{count}-cores", set(available[:count])))
            over_first = f" ({speeds[-1] / speeds[0]:.2f}x)" if len(speeds) > 1 else ""
            print(f"{count} core{'s' if count > 1 else ' '}: {speeds[-1]:.3f} pages/s{over_first}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
