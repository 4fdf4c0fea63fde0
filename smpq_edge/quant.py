"""TFLite-faithful fake quantisation, shared by the supernet, the finetune and the exporter.

``QuantNet`` executes a traced ``Graph`` op by op with the numerics TFLite uses for a
full-integer model: BatchNorm folded into the convolution, weights symmetric with zero point 0
(per output channel for conv and depthwise, per tensor for fully connected, which TFLM needs for
INT4), int32 bias (kept float here: its rounding is negligible), int8 asymmetric activations per tensor with
calibrated ranges, ReLU/ReLU6 fused into the op's output range, pooling and reshape keeping their
input's scale. Gradients pass straight through the rounding.

Each weighted layer holds its candidate weight bit-widths. Its output mixes the candidates'
quantised weights by softmax(alpha) over the *active* candidates; by linearity of convolution,
mixing the weights equals mixing the branch outputs. For the Shapley search, ``forward`` takes
per-coalition masks: the batch is then C copies of the validation batch, and each copy runs with
its own set of active candidates in one pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from smpq_edge.graph import Graph, Op
from smpq_edge.distributed import SINGLE_PROCESS, Context

INT8_MIN, INT8_MAX = -128, 127


def weight_qmax(bits: int) -> int:
    """Symmetric weight range [-qmax, qmax]: 127 for int8, 7 for int4 (zero point 0)."""
    return 2 ** (bits - 1) - 1


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def weight_scale(weight: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
    """Scale per output channel (dim 0 of a torch weight) or per tensor, from max |w|."""
    if per_channel:
        absmax = weight.detach().abs().flatten(1).amax(dim=1)
    else:
        absmax = weight.detach().abs().amax().reshape(1)
    return torch.clamp(absmax, min=1e-8) / weight_qmax(bits)


def fake_quant_weight(weight: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
    scale = weight_scale(weight, bits, per_channel).reshape(-1, *([1] * (weight.dim() - 1)))
    qmax = weight_qmax(bits)
    return torch.clamp(_round_ste(weight / scale), -qmax, qmax) * scale


def quantize_weight(weight: torch.Tensor, bits: int, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer weights and their scales, exactly as ``fake_quant_weight`` rounds them."""
    scale = weight_scale(weight, bits, per_channel)
    shaped = scale.reshape(-1, *([1] * (weight.dim() - 1)))
    qmax = weight_qmax(bits)
    return torch.clamp(torch.round(weight.detach() / shaped), -qmax, qmax).to(torch.int8), scale


@dataclass(frozen=True)
class ActivationParams:
    scale: float
    zero_point: int


class ActQuant(nn.Module):
    """Asymmetric int8 per-tensor fake quantiser with a running min/max range.

    The range always includes 0 (TFLite needs zero exactly representable). While ``observing``,
    training batches move the range by an exponential moving average, once per batch: forward
    passes only record the batch's min and max, and ``commit`` (called after the batch's last
    gradient shard, on every rank) applies them. So every shard of a batch, on any rank, is
    quantised with the same range, which keeps sharded and distributed training exact.
    """

    def __init__(self, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("initialised", torch.tensor(False))
        self.observing = True
        self.enabled = True
        self._pending: tuple[float, float] | None = None

    def _update(self, lo: float, hi: float) -> None:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if not bool(self.initialised):
            self.lo.fill_(lo), self.hi.fill_(hi), self.initialised.fill_(True)
        else:
            self.lo.mul_(self.momentum).add_((1 - self.momentum) * lo)
            self.hi.mul_(self.momentum).add_((1 - self.momentum) * hi)

    def commit(self, context: Context) -> None:
        """Apply the batch's recorded range (the min and max over all ranks' shards)."""
        lo, hi = self._pending if self._pending is not None else (math.inf, -math.inf)
        self._pending = None
        lo, hi = context.min(lo), context.max(hi)
        if math.isfinite(lo):
            self._update(lo, hi)

    def params(self) -> ActivationParams:
        lo, hi = float(self.lo), float(self.hi)
        scale = max(hi - lo, 1e-8) / (INT8_MAX - INT8_MIN)
        zero_point = int(min(max(round(INT8_MIN - lo / scale), INT8_MIN), INT8_MAX))
        return ActivationParams(scale, zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing and x.numel():
            lo, hi = float(x.detach().min()), float(x.detach().max())
            if not bool(self.initialised):
                self._update(lo, hi)  # the very first batch sets the range it is quantised with
            elif self.training:
                seen = self._pending or (lo, hi)
                self._pending = (min(seen[0], lo), max(seen[1], hi))
        if not self.enabled:
            return x
        p = self.params()
        q = torch.clamp(_round_ste(x / p.scale) + p.zero_point, INT8_MIN, INT8_MAX)
        return (q - p.zero_point) * p.scale


class MixedLayer(nn.Module):
    """A conv, depthwise conv or fully connected layer with BatchNorm folded in, whose weights are
    fake-quantised at each candidate bit-width and mixed by softmax(alpha) over active candidates."""

    def __init__(self, op: Op, weight: torch.Tensor, bias: torch.Tensor, candidates: tuple[int, ...]):
        super().__init__()
        self.op = op
        self.candidates = tuple(candidates)
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())
        self.alpha = nn.Parameter(torch.zeros(len(candidates)))
        self.register_buffer("active", torch.ones(len(candidates), dtype=torch.bool))
        # Per-channel for conv and depthwise; per tensor for FC (TFLM's INT4 FC path needs it).
        self.per_channel = op.kind != "fc"

    def quantised_weight(self, bits: int) -> torch.Tensor:
        return fake_quant_weight(self.weight, bits, self.per_channel)

    def mix(self, active: torch.Tensor) -> torch.Tensor:
        """Softmax(alpha) restricted to the active candidates."""
        logits = self.alpha.masked_fill(~active, float("-inf"))
        return torch.softmax(logits, dim=-1)

    def mixed_weight(self, active: torch.Tensor) -> torch.Tensor:
        weights = self.mix(active)
        return sum(weights[k] * self.quantised_weight(bits)
                   for k, bits in enumerate(self.candidates) if bool(active[k]))

    def apply(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # The bias stays float: TFLite stores it as int32 at scale input_scale x weight_scale,
        # whose rounding error (half of that scale) is orders of magnitude below an output step.
        bias = self.bias
        if self.op.kind == "fc":
            return F.linear(x, weight, bias)
        groups = self.weight.shape[0] if self.op.kind == "depthwise" else 1
        return F.conv2d(x, weight, bias, stride=self.op.stride, padding=self.op.padding, groups=groups)

    def forward(self, x: torch.Tensor, coalition_active: torch.Tensor | None = None) -> torch.Tensor:
        if coalition_active is None:
            return self.apply(x, self.mixed_weight(self.active))
        # coalition_active: (C, K); x holds C equal-sized chunks, one per coalition. Coalitions
        # that share the same active subset share one convolution call.
        chunks = coalition_active.shape[0]
        rows_per_chunk = x.shape[0] // chunks
        codes = (coalition_active.long() * (2 ** torch.arange(len(self.candidates), device=x.device))).sum(1)
        out = None
        for code in torch.unique(codes).tolist():
            chunk_ids = torch.nonzero(codes == code).flatten()
            rows = (chunk_ids[:, None] * rows_per_chunk + torch.arange(rows_per_chunk, device=x.device)).flatten()
            y = self.apply(x[rows], self.mixed_weight(coalition_active[chunk_ids[0]]))
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[rows] = y
        return out


def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the preceding convolution, as the TFLite converter does."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    factor = gamma / std
    folded_w = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
    base = bias if bias is not None else torch.zeros_like(bn.running_mean)
    return folded_w, (base - bn.running_mean) * factor + beta


def _apply_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(x)
    if activation == "relu6":
        return torch.clamp(x, 0.0, 6.0)
    return x


class QuantNet(nn.Module):
    """The traced graph run with TFLite-faithful fake quantisation (see module docstring)."""

    def __init__(self, graph: Graph, source: nn.Module, candidates: tuple[int, ...]):
        super().__init__()
        self.graph = graph
        self.candidates = tuple(sorted(candidates))
        modules = dict(source.named_modules())
        self.layer_index = {op.name: i for i, op in enumerate(graph.layers)}
        self.layers = nn.ModuleDict()
        self.act = nn.ModuleDict()
        # Ops that keep their input's quantisation (TFLite requires the same scale in and out).
        self.shares_input_scale = {op.name for op in graph.ops if op.kind in ("avgpool", "maxpool", "global_avgpool", "reshape")}
        with torch.no_grad():
            for op in graph.ops:
                if op.weighted:
                    module = modules[op.module]
                    weight = module.weight.detach().clone()
                    bias = module.bias.detach().clone() if module.bias is not None else None
                    if op.bn_module:
                        weight, bias = fold_batchnorm(weight, bias, modules[op.bn_module])
                    if bias is None:
                        bias = torch.zeros(weight.shape[0])
                    self.layers[self.key(op.name)] = MixedLayer(op, weight, bias, self.candidates)
                if op.name not in self.shares_input_scale:
                    self.act[self.key(op.name)] = ActQuant()

    @staticmethod
    def key(name: str) -> str:
        """ModuleDict keys cannot contain dots."""
        return name.replace(".", "__")

    def layer(self, name: str) -> MixedLayer:
        return self.layers[self.key(name)]

    def mixed_layers(self) -> list[MixedLayer]:
        return [self.layers[self.key(op.name)] for op in self.graph.layers]

    def activation_quantiser(self, name: str) -> ActQuant:
        """The quantiser that sets op ``name``'s output scale (its source's, for scale-sharing ops)."""
        while name in self.shares_input_scale:
            name = self.graph.op(name).inputs[0]
        return self.act[self.key(name)]

    def set_quantise_activations(self, enabled: bool) -> None:
        for quantiser in self.act.values():
            quantiser.enabled = enabled

    def commit_observations(self, context: Context = SINGLE_PROCESS) -> None:
        """End of a training batch: move every activation range by the batch's min and max."""
        for quantiser in self.act.values():
            quantiser.commit(context)

    def set_observing(self, observing: bool) -> None:
        for quantiser in self.act.values():
            quantiser.observing = observing

    def set_policy(self, bits: dict[str, int] | None) -> None:
        """Activate one candidate per layer (``bits``), or all candidates (None) for the supernet."""
        for op in self.graph.layers:
            layer = self.layer(op.name)
            if bits is None:
                layer.active.fill_(True)
            else:
                layer.active.copy_(torch.tensor([b == bits[op.name] for b in layer.candidates], device=layer.active.device))

    def players(self) -> list[tuple[str, int]]:
        """Shapley players: (layer, candidate bits) in layer order."""
        return [(op.name, bits) for op in self.graph.layers for bits in self.candidates]

    def forward(self, x: torch.Tensor, coalitions: torch.Tensor | None = None) -> torch.Tensor:
        """``coalitions``: optional (C, players) bool masks; ``x`` then holds C copies of a batch."""
        k = len(self.candidates)
        values: dict[str, torch.Tensor] = {}
        for op in self.graph.ops:
            if op.kind == "input":
                y = x
            elif op.weighted:
                i = self.layer_index[op.name]
                active = None if coalitions is None else coalitions[:, i * k:(i + 1) * k]
                y = self.layer(op.name)(values[op.inputs[0]], active)
            elif op.kind == "add":
                y = values[op.inputs[0]] + values[op.inputs[1]]
            elif op.kind == "avgpool":
                y = F.avg_pool2d(values[op.inputs[0]], op.kernel, op.stride, op.padding)
            elif op.kind == "global_avgpool":
                y = values[op.inputs[0]].mean(dim=(2, 3), keepdim=True)
            elif op.kind == "maxpool":
                y = F.max_pool2d(values[op.inputs[0]], op.kernel, op.stride, op.padding)
            elif op.kind == "reshape":
                y = values[op.inputs[0]].reshape(values[op.inputs[0]].shape[0], *op.out_shape)
            elif op.kind == "relu":
                y = values[op.inputs[0]]
            else:
                raise AssertionError(f"op kind {op.kind} has no executor")
            y = _apply_activation(y, op.activation)
            y = self.activation_quantiser(op.name)(y)
            values[op.name] = y
        return values[self.graph.output]
