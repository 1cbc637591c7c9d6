"""The run's curves as one PNG: calls/s against clients and against workers, latency against
queue depth (matplotlib, when it is importable)."""

from __future__ import annotations

import importlib.util

from _sections import AXES, SYSTEM_LABELS, WINDOW, Depth, Point

MISSING = "matplotlib is not importable (pip install -e '.[bench]'): no curves drawn"


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def draw(path: str, points: list[Point], depths: list[Depth], title: str) -> None:
    """Writes the PNG; axes with nothing measured say so instead of staying blank."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    fig, (clients, workers, queue) = plt.subplots(1, 3, figsize=(16, 5))
    for ax, axes_shown, xlabel in ((clients, AXES[:2], "clients (each one call at a time)"),
                                   (workers, AXES[2:], f"workers ({WINDOW} calls in flight)")):
        drawn = False
        for system in SYSTEM_LABELS:
            for axis in axes_shown:
                line = sorted((p.n, p.row.calls_s) for p in points if p.system == system and p.axis == axis)
                if line:
                    label = f"{SYSTEM_LABELS[system]}, {axis}" if len(axes_shown) > 1 else SYSTEM_LABELS[system]
                    ax.plot([n for n, _ in line], [v for _, v in line], marker="o", label=label)
                    drawn = True
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("calls/s")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize="small")
            ticks = sorted({p.n for p in points if p.axis in axes_shown})
            ax.set_xticks(ticks, [str(n) for n in ticks])
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    if depths:
        xs = list(range(len(depths)))
        for label, values in (("p50", [d.row.p50_us for d in depths]), ("p99", [d.row.p99_us for d in depths])):
            queue.plot(xs, [(v or 0) / 1000 for v in values], marker="o", label=label)
        queue.set_xticks(xs, ["1 at a time" if not d.depth else f"{d.depth:,}" for d in depths])
        queue.set_yscale("log")
        queue.legend(fontsize="small")
    else:
        queue.text(0.5, 0.5, "not measured", ha="center", va="center", transform=queue.transAxes)
    queue.set_xlabel("calls submitted at once (queue depth)")
    queue.set_ylabel("latency, submission to reply (ms)")
    queue.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
