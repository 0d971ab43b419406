"""The console every command prints to (stderr), and the progress display of a run."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=True)


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                    transient=False)


def describe_step(values: dict[str, float]) -> str:
    parts = [f"{k} {v:.4g}" if k != "lr" else f"lr {v:.2e}" for k, v in values.items()]
    return "  ".join(parts)
