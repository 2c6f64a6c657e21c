"""The layers stay in place: operators/ imports nothing from pipeline/, and no modules import each
other in a circle. Both are checked twice: by import-linter's contracts in pyproject.toml, and here
directly on grimp's import graph, so a circle fails the suite even if the contracts were loosened."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("operators", "pipeline")


def test_import_linter_contracts_are_kept():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def import_graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, cache_dir=None)


def test_operators_import_nothing_from_pipeline():
    graph = import_graph()
    chains = graph.find_shortest_chains(importer="operators", imported="pipeline", as_packages=True)
    assert not chains, f"operators imports pipeline: {sorted(chains)}"


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_cycles_between_modules():
    assert import_cycles(import_graph()) == []


def test_the_job_and_its_cpu_stages_start_without_torch():
    """The CPU workers import the job module to run rasterize and layout, and the driver imports the
    command line: neither may load torch or transformers (seconds per process before the first page).
    Only the recognizer actor and the model check load them. Nor OCRmyPDF (most of a second): only the
    driver's sink loads it, for a PDF export."""
    script = ("import sys; import pipeline.job, pipeline.stages, pipeline.cli; "
              "pipeline.cli.build_parser(['run', 'in', '--output', 'out']); "
              "print(sorted(name for name in ('torch', 'transformers', 'ocrmypdf') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
