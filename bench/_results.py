"""Shared by the bench scripts: replace one script's section of bench/RESULTS.md, keep the rest."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(heading: str, body: str) -> None:
    """Replace the section that starts at ``heading`` (up to the next '## ' heading) where it
    stands, or append it, so the file keeps its order."""
    section = heading + "\n\n" + body.strip().removeprefix(heading).strip() + "\n"
    current = RESULTS.read_text() if RESULTS.exists() else "# Measured results\n"
    if heading not in current:
        RESULTS.write_text(current.rstrip() + "\n\n" + section)
        return
    start = current.index(heading)
    end = current.find("\n## ", start + len(heading))
    rest = "" if end == -1 else "\n" + current[end + 1:]
    RESULTS.write_text(current[:start] + section + rest)


def timed_log(threads: int):
    """Set torch's thread count (0: leave it) and return a log function that stamps each line with
    the seconds since this call: the benches' progress lines."""
    import time

    import torch

    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f} s] {msg}", flush=True)

    return log


def paired(diff) -> str:
    """A paired difference over seeds: mean ± std (seeds above/equal/below zero)."""
    return f"{diff.mean():+.2f} ± {diff.std():.2f} ({(diff > 0).sum()}/{(diff == 0).sum()}/{(diff < 0).sum()})"


def task_axes(tasks: int):
    """A figure with one panel per task, side by side (matplotlib without a display): (figure, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, tasks, figsize=(6.5 * tasks, 4.2), squeeze=False, layout="constrained")
    return figure, axes[0]


def save_figure(figure, path) -> None:
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=110)
    plt.close(figure)
