"""`llmft plot`: training curves from one or more runs' metrics.jsonl, one panel per figure, runs overlaid."""

from __future__ import annotations

from pathlib import Path

from llmft.data.records import read_jsonl
from llmft.errors import DataError, LlmftError

# the figures worth a panel, in display order (each stage logs the ones that apply to it)
# (each name means one thing in every stage: docs/metrics.md)
PANELS = ["loss", "eval/loss", "accuracy", "eval/accuracy", "margin", "eval/margin", "reward_mean", "reward_std",
          "rewards/accuracies", "eval/rewards/accuracies", "rewards/margins", "eval/rewards/margins",
          "kl_reference_point", "reward", "eval/reward", "eval/constraints/pass_rate", "eval/rouge_l", "eval/meteor",
          "eval/bleu", "eval/substance", "eval/kl", "eval/completions/mean_length",
          "rewards/reward_model/out_of_range", "frac_reward_zero_std",
          "completions/mean_length", "completions/clipped_ratio", "clip_ratio/region_mean", "objective/kl", "kl",
          "entropy", "logprob_gap", "lr", "tokens_per_s", "pairs_per_s", "answers_per_s", "episodes_per_s"]


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metric name → [(step, value)] from run_dir/metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl (not an llmft run directory?)")
    series: dict[str, list[tuple[int, float]]] = {}
    for rec in read_jsonl(path):
        for key, value in rec.row.items():
            if key != "step" and isinstance(value, (int, float)):
                series.setdefault(key, []).append((rec.row["step"], float(value)))
    return series


def plot(run_dirs: list[Path], out: Path) -> list[str]:
    """Draw every known figure that any run logged into a PNG at `out`; return the panels drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LlmftError("llmft plot needs matplotlib: pip install matplotlib") from None
    runs = {str(d): read_metrics(d) for d in run_dirs}
    panels = [p for p in PANELS if any(p in series for series in runs.values())]
    if not panels:
        raise DataError(f"no plottable metrics in {', '.join(runs)}")
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, panels, strict=False):
        for i, (run, series) in enumerate(runs.items()):
            if name in series:  # one colour per run in every panel
                steps, values = zip(*series[name], strict=True)
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=run,
                        color=f"C{i % 10}")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return panels
