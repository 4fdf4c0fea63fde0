"""Training and evaluation loops shared by the float pre-training, the supernet, the baselines and
the finetune: plain mini-batch Adam on in-memory arrays, seeded, with an optional progress bar."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from smpq_edge.inputs.data import Dataset
from smpq_edge.common.progress import progress as progress_bar
from smpq_edge.network.quant import QuantNet
from smpq_edge.common.distributed import SINGLE_PROCESS, Context
from smpq_edge.inputs.task import CLASSIFICATION, Task, task_of


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    shards: int = 1  # gradient shards per batch; ranks split them (see distributed)
    # Weight of distillation from a teacher's (the float model's) outputs against the labels' loss:
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


# Inference batch: the integer-exact path's int64 intermediates of a 1,024-image ResNet-8 batch are
# 128 MB each; at 128 they stay in cache and a pass over 2,000 images took 2.2 s instead of 4.9 s.
PREDICT_BATCH = 128


@torch.no_grad()
def predictions(model: nn.Module, x: np.ndarray, task: Task = CLASSIFICATION,
                batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """What ``task`` keeps of the model's outputs per sample (the top-1 class, or the output)."""
    model.eval()
    device = device_of(model)
    out = [task.predict(model(torch.from_numpy(x[idx]).to(device))).cpu().numpy()
           for idx in batches(x, np.zeros(len(x)), batch_size, None)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def per_sample(model: nn.Module, x: np.ndarray, y: np.ndarray, task: Task = CLASSIFICATION) -> np.ndarray:
    """Per sample: the task's score (top-1 hit, or minus the reconstruction error)."""
    return task.per_sample(predictions(model, x, task), x, y)


def score(model: nn.Module, x: np.ndarray, y: np.ndarray, task: Task = CLASSIFICATION) -> float:
    """Accuracy, or minus the MSE: higher is better."""
    return float(per_sample(model, x, y, task).mean())


def _flat_gradient(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def _set_gradient(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].reshape(p.shape).clone()
        offset += p.numel()


def _loss(task: Task, outputs: torch.Tensor, labels: torch.Tensor, teacher: nn.Module | None, x: torch.Tensor,
          distill: float) -> torch.Tensor:
    """The task's summed loss (cross-entropy to the labels, MSE to the input), mixed with its loss
    to the teacher's outputs (cross-entropy to its softmax, MSE to its reconstruction)."""
    loss = task.loss(outputs, x, labels)
    if teacher is None or distill == 0.0:
        return loss
    with torch.no_grad():
        target = teacher(x)
    return (1.0 - distill) * loss + distill * task.distill_loss(outputs, target)


def train(model: nn.Module, data: Dataset, config: TrainConfig, seed: int, *, desc: str = "train",
          params: list[nn.Parameter] | list[dict] | None = None, extra_loss: Callable[[], torch.Tensor] | None = None,
          after_epoch: Callable[[int], dict] | None = None, progress: bool = True,
          teacher: nn.Module | None = None, context: Context = SINGLE_PROCESS) -> list[dict]:
    """Adam with a cosine learning rate; returns one record per epoch.

    ``params`` restricts what is trained (the supernet trains weights, not alpha, here), as a
    list of parameters or of optimiser groups with their own learning rates;
    ``extra_loss`` adds a term such as DMPQ's cost penalty; ``after_epoch`` runs between epochs
    (the Shapley update of alpha) and its returned dict joins the epoch's record. With
    ``config.distill`` > 0 the loss mixes in the task's loss to ``teacher``'s outputs. Under
    ``torchrun`` each rank computes its shards of every batch and gradients are summed across ranks.
    """
    rng = np.random.default_rng(seed)
    device = device_of(model)
    task = task_of(data)
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    # Optimiser groups ({"params": [...], "lr": ...}) give some parameters their own rate.
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    params = [p for group in groups for p in group["params"]]
    optimiser = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
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
                loss = _loss(task, model(xb), yb, teacher, xb, config.distill) / len(idx)
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
                  "val_acc": score(model, data.x_val, data.y_val, task)}
        if after_epoch is not None:
            record.update(after_epoch(epoch))
        history.append(record)
        bar.set_postfix({"epochs done": f"{epoch + 1}/{config.epochs}",
                         **{k: f"{v:.3f}" if isinstance(v, float) else v for k, v in record.items() if k != "epoch"}})
    bar.close()
    return history
