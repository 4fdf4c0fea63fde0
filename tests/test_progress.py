"""Long work is never silent for long when output is not a terminal: a line at least every 30 s."""

import numpy as np
import torch
from torch import nn

import smpq_edge.common.progress as progress
from smpq_edge.inputs.data import Dataset
from smpq_edge.search.train import TrainConfig, train


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_lines_at_most_every_interval_and_after_any_quiet_interval(monkeypatch, capsys):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    monkeypatch.setattr(progress, "_last_line", clock.now)
    bar = progress.progress(100, "warm-up", "batches")  # stderr under capsys is not a terminal
    for step in range(100):
        clock.now += 7.0  # one batch every 7 s
        bar.update()
        if step == 50:
            bar.set_postfix({"epoch": "2/2", "loss": "0.123"})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 100 * 7 // 35  # a line at the first batch 30 s or more after the last line
    assert lines[0] == "warm-up: 5/100 batches (35 s)"
    assert lines[-1].startswith("warm-up: 100/100 batches, epoch 2/2, loss 0.123")
    # A bar that starts later keeps the pace the last one set, instead of waiting 30 s of its own.
    clock.now += 29.0
    progress.progress(3, "finetune", "batches").update()
    clock.now += 2.0
    progress.progress(3, "finetune", "batches").update()
    assert capsys.readouterr().err.splitlines() == ["finetune: 1/3 batches (0 s)"]


def test_training_logs_progress_lines_when_not_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 1, 2, 2)).astype(np.float32)
    y = rng.integers(0, 2, size=40)
    data = Dataset("tiny", x, y, x, y, x, y, num_classes=2)
    torch.manual_seed(0)
    train(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), data, TrainConfig(epochs=2, batch_size=10), seed=0,
          desc="float")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "float: 1/8 batches (0 s)" and lines[-1].startswith("float: 8/8 batches, epochs done 1/2, loss ")
    assert len(lines) == 8


class TickingClock(Clock):
    """Each reading is 11 s after the last: every scored policy of a Shapley table takes 11 s."""

    def __call__(self):
        self.now += 11.0
        return self.now


def test_a_long_shapley_table_prints_progress_lines(monkeypatch, capsys):
    from smpq_edge.network.graph import trace
    from smpq_edge.network.quant import QuantNet
    from smpq_edge.search.smpq import estimate_shapley

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                           nn.Flatten(), nn.Linear(64, 3)).eval()
    net = QuantNet(trace(module, (1, 4, 4)), module, (4, 8))
    x = torch.randn(32, 1, 4, 4)
    net.train()
    with torch.no_grad():
        net(x)
        net.commit_observations()
    net.eval()
    clock = TickingClock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    monkeypatch.setattr(progress, "_last_line", clock.now)
    y = np.zeros(32, np.int64)
    estimate_shapley(net, x.numpy(), y, 96, 0.5, 0, players="layers", exact_layers=True, show_progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("Shapley table: ") and line.endswith(" s)") for line in lines), lines
    assert lines[-1].startswith("Shapley table: 8/8 policies")  # 2^3 layer policies, enumerated exactly
    estimate_shapley(net, x.numpy(), y, 96, 0.5, 0, players="layers", exact_layers=True)
    assert capsys.readouterr().err == "", "silent unless asked"
