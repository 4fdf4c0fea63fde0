"""Training and evaluation loops shared by the float pre-training, the supernet, the baselines and
the finetune: plain mini-batch Adam on in-memory arrays, seeded, with an optional progress bar."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from smpq_edge.data import Dataset


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 1e-4


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, rng: np.random.Generator | None):
    order = rng.permutation(len(y)) if rng is not None else np.arange(len(y))
    for start in range(0, len(y), batch_size):
        idx = order[start:start + batch_size]
        yield torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> float:
    model.eval()
    correct = 0
    for xb, yb in batches(x, y, batch_size, None):
        correct += int((model(xb).argmax(1) == yb).sum())
    return correct / len(y)


def train(model: nn.Module, data: Dataset, config: TrainConfig, seed: int, *, desc: str = "train",
          params: list[nn.Parameter] | None = None, extra_loss: Callable[[], torch.Tensor] | None = None,
          after_epoch: Callable[[int], dict] | None = None, progress: bool = True) -> list[dict]:
    """Adam with a cosine learning rate; returns one record per epoch.

    ``params`` restricts what is trained (the supernet trains weights, not alpha, here);
    ``extra_loss`` adds a term such as DMPQ's cost penalty; ``after_epoch`` runs between epochs
    (the Shapley update of alpha) and its returned dict joins the epoch's record.
    """
    rng = np.random.default_rng(seed)
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * -(-len(data.y_train) // config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(steps, 1))
    history = []
    bar = tqdm(range(config.epochs), desc=desc, leave=False, disable=None if progress else True, unit="epoch")
    for epoch in bar:
        model.train()
        total, count = 0.0, 0
        for xb, yb in batches(data.x_train, data.y_train, config.batch_size, rng):
            loss = F.cross_entropy(model(xb), yb)
            if extra_loss is not None:
                loss = loss + extra_loss()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total, count = total + loss.item() * len(yb), count + len(yb)
        record = {"epoch": epoch, "loss": total / max(count, 1), "val_acc": accuracy(model, data.x_val, data.y_val)}
        if after_epoch is not None:
            record.update(after_epoch(epoch))
        history.append(record)
        bar.set_postfix({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in record.items() if k != "epoch"})
    return history
