"""A fine-tuning job's loss curve as a PNG (matplotlib, the `plot` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import PlotUnavailableError


def save_loss_plot(path: str | Path, train: Sequence[tuple[int, float]],
                   eval: Sequence[tuple[int, float]] = (), title: str = "Training loss") -> Path:
    """Write the (step, loss) curves to `path` as a PNG and return the path."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PlotUnavailableError("saving a loss plot needs matplotlib: pip install 'loquetier[plot]'") from e
    # a Figure without pyplot: no global state, no GUI backend, safe off the main thread
    fig = Figure(figsize=(6.4, 4.0), dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), marker="." if len(train) < 50 else None, label="train")
    if eval:
        ax.plot(*zip(*eval), marker="o", label="eval")
    ax.set(xlabel="optimizer step", ylabel="loss", title=title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    if train and eval:
        ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
