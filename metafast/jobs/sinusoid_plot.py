"""PNG figures of adapted sinusoid fits. Uses the Agg canvas directly (no pyplot), so it neither
needs a display nor changes the matplotlib backend of the calling program."""
import math
from typing import Dict

import torch

from ..runtime.checkpoint import atomic_write


def plot_sinusoid_fits(path: str, grid_x: torch.Tensor, true_y: torch.Tensor, fits: Dict[str, torch.Tensor],
                       support_x: torch.Tensor, support_y: torch.Tensor, title: str = "", amplitudes=None, phases=None) -> str:
    """One panel per task: the true curve, each fit in ``fits`` (label -> [T, N]) and the support points.

    grid_x [N], true_y [T, N], support_x/support_y [T, K]; all on any device.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid_x = grid_x.detach().cpu()
    tasks = true_y.shape[0]
    cols = min(tasks, 2)
    rows = math.ceil(tasks / cols)
    fig = Figure(figsize=(5.0 * cols, 3.4 * rows), dpi=100)
    FigureCanvasAgg(fig)
    styles = [dict(color="0.55", linestyle=":"), dict(color="tab:orange"), dict(color="tab:green"),
              dict(color="tab:purple"), dict(color="tab:brown")]
    for t in range(tasks):
        ax = fig.add_subplot(rows, cols, t + 1)
        ax.plot(grid_x, true_y[t].detach().cpu(), color="tab:blue", linewidth=2.0, label="true")
        for (label, y), style in zip(fits.items(), styles):
            ax.plot(grid_x, y[t].detach().cpu(), linewidth=1.5, label=label, **style)
        ax.scatter(support_x[t].detach().cpu(), support_y[t].detach().cpu(), color="black", marker="^",
                   s=30, zorder=5, label=f"K={support_x.shape[1]} support")
        ax.set_xlabel("x")
        if amplitudes is not None and phases is not None:
            ax.set_title(f"A={float(amplitudes[t]):.2f}, phase={float(phases[t]):.2f}", fontsize=9)
        ax.grid(alpha=0.3)
        if t == 0:
            ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return path
