"""Training and evaluation loops shared by the float pre-training, the supernet, the baselines and
the finetune: plain mini-batch Adam on in-memory arrays, seeded, with an optional progress bar."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from smpq_edge.data import Dataset
from smpq_edge.progress import progress as progress_bar
from smpq_edge.quant import QuantNet
from smpq_edge.distributed import SINGLE_PROCESS, Context


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    shards: int = 1  # gradient shards per batch; ranks split them (see distributed)
    # Weight of distillation from a teacher's (the float model's) softmax against the labels' loss:
    # for a model that arrives trained, whose user's data may be small or not what it was trained on.
    distill: float = 0.0


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, rng: np.random.Generator | None):
    """Index arrays of mini-batches, shuffled when ``rng`` is given."""
    order = rng.permutation(len(y)) if rng is not None else np.arange(len(y))
    for start in range(0, len(y), batch_size):
        yield order[start:start + batch_size]


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def correct(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Per sample: is the model's top-1 class the label?"""
    model.eval()
    device = device_of(model)
    hits = [model(torch.from_numpy(x[idx]).to(device)).argmax(1).cpu().numpy() == y[idx]
            for idx in batches(x, y, batch_size, None)]
    return np.concatenate(hits) if hits else np.zeros(0, dtype=bool)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> float:
    return float(correct(model, x, y, batch_size).mean())


def _flat_gradient(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def _set_gradient(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].reshape(p.shape).clone()
        offset += p.numel()


def _loss(logits: torch.Tensor, labels: torch.Tensor, teacher: nn.Module | None, x: torch.Tensor,
          distill: float) -> torch.Tensor:
    """Summed cross-entropy to the labels, mixed with cross-entropy to the teacher's softmax."""
    loss = F.cross_entropy(logits, labels, reduction="sum")
    if teacher is None or distill == 0.0:
        return loss
    with torch.no_grad():
        target = torch.softmax(teacher(x), dim=1)
    return (1.0 - distill) * loss + distill * F.cross_entropy(logits, target, reduction="sum")


def train(model: nn.Module, data: Dataset, config: TrainConfig, seed: int, *, desc: str = "train",
          params: list[nn.Parameter] | None = None, extra_loss: Callable[[], torch.Tensor] | None = None,
          after_epoch: Callable[[int], dict] | None = None, progress: bool = True,
          teacher: nn.Module | None = None, context: Context = SINGLE_PROCESS) -> list[dict]:
    """Adam with a cosine learning rate; returns one record per epoch.

    ``params`` restricts what is trained (the supernet trains weights, not alpha, here);
    ``extra_loss`` adds a term such as DMPQ's cost penalty; ``after_epoch`` runs between epochs
    (the Shapley update of alpha) and its returned dict joins the epoch's record. With
    ``config.distill`` > 0 the loss mixes in cross-entropy to ``teacher``'s softmax. Under
    ``torchrun`` each rank computes its shards of every batch and gradients are summed across ranks.
    """
    rng = np.random.default_rng(seed)
    device = device_of(model)
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * -(-len(data.y_train) // config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(steps, 1))
    history = []
    # Counted in batches, not epochs: a line at least every 30 s in a log, however long an epoch.
    bar = progress_bar(steps, desc, "batches", enabled=progress)
    for epoch in range(config.epochs):
        model.train()
        total = 0.0
        for idx in batches(data.x_train, data.y_train, config.batch_size, rng):
            shards = np.array_split(idx, config.shards)
            flats = []
            for shard in context.shard_ids(len(shards)):
                part = shards[shard]
                xb = torch.from_numpy(data.x_train[part]).to(device)
                yb = torch.from_numpy(data.y_train[part]).to(device)
                # This shard's share of the batch mean: the shards' gradients sum to the batch's.
                loss = _loss(model(xb), yb, teacher, xb, config.distill) / len(idx)
                if extra_loss is not None and shard == 0:
                    loss = loss + extra_loss()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                flats.append(_flat_gradient(params))
                total += loss.item() * len(idx)
            _set_gradient(params, context.sum_shards(flats, len(shards)))
            if isinstance(model, QuantNet):
                model.commit_observations(context)
            optimiser.step()
            schedule.step()
            bar.update()
        record = {"epoch": epoch, "loss": context.sum(total) / len(data.y_train),
                  "val_acc": accuracy(model, data.x_val, data.y_val)}
        if after_epoch is not None:
            record.update(after_epoch(epoch))
        history.append(record)
        bar.set_postfix({"epochs done": f"{epoch + 1}/{config.epochs}",
                         **{k: f"{v:.3f}" if isinstance(v, float) else v for k, v in record.items() if k != "epoch"}})
    bar.close()
    return history
