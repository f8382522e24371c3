"""End-of-run files: ``summary.json`` and ``loss.png`` (train and eval curves)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraq.paths import atomic_write_bytes, atomic_write_text


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = Path(run_dir) / "summary.json"
    atomic_write_text(path, json.dumps(summary, indent=2, default=str) + "\n")
    return path


def read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def plot_loss(metrics_path: Path, out_png: Path, title: str = "") -> Path | None:
    """Train loss per step and eval loss at each evaluation, on one chart."""
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train" and "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("kind") == "eval" and r.get("eval_loss") is not None]
    return _chart([("train loss", train, "-", 1.2), ("eval loss", evals, "o-", 1.5)], "loss", title, out_png)


def plot_reward(metrics_path: Path, out_png: Path, title: str = "", window: int = 20,
                base_success: float | None = None) -> Path | None:
    """GRPO: the mean reward of each step's completions, its mean over the last ``window`` steps, and the
    held-out prompts' greedy success at each evaluation (at step 0: the base model's, when given)."""
    rows = read_metrics(metrics_path)
    steps = [(r["step"], r["reward"]) for r in rows if r.get("kind") == "train" and r.get("reward") is not None]
    smooth = [(s, sum(v for _, v in steps[max(0, k - window + 1):k + 1]) / len(steps[max(0, k - window + 1):k + 1]))
              for k, (s, _) in enumerate(steps)]
    evals = [(r["step"], r["eval_success"]) for r in rows if r.get("kind") == "eval" and "eval_success" in r]
    if evals and base_success is not None:
        evals.insert(0, (0, base_success))
    return _chart([("reward (step)", steps, "-", 0.6), (f"reward ({window}-step mean)", smooth, "-", 2.0),
                   ("held-out success (greedy)", evals, "o-", 1.5)], "reward", title, out_png)


def _chart(series: list[tuple[str, list, str, float]], ylabel: str, title: str, out_png: Path) -> Path | None:
    """``(label, [(x, y)], style, width)`` lines on one chart, written atomically as a PNG (None: no points)."""
    import io
    import os

    from loraq.paths import cache_dir

    # matplotlib makes ~/.config/matplotlib and a font cache on import: keep them in loraq's cache instead
    os.environ.setdefault("MPLCONFIGDIR", str(cache_dir() / "matplotlib"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(points for _, points, _, _ in series):
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for label, points, style, width in series:
        if points:
            ax.plot(*zip(*points), style, label=label, linewidth=width)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(out_png), buf.getvalue())
    return Path(out_png)
