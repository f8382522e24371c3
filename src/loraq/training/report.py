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
    import io
    import os

    from loraq.paths import cache_dir

    # matplotlib makes ~/.config/matplotlib and a font cache on import: keep them in loraq's cache instead
    os.environ.setdefault("MPLCONFIGDIR", str(cache_dir() / "matplotlib"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train" and "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("kind") == "eval" and r.get("eval_loss") is not None]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(out_png), buf.getvalue())
    return Path(out_png)
