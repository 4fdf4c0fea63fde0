"""TFLite-faithful fake quantisation, shared by the supernet, the finetune and the exporter.

``QuantNet`` executes a traced ``Graph`` op by op with the numerics TFLite uses for a
full-integer model: BatchNorm folded into the convolution, weights symmetric with zero point 0
(per output channel for conv and depthwise, per tensor for fully connected, which TFLM needs for
INT4), int32 bias, int8 asymmetric activations per tensor with calibrated ranges, ReLU/ReLU6 fused
into the op's output range, pooling and reshape keeping their input's scale. Training (gradient on)
keeps the bias float and requantises in float32, with gradients straight through the rounding.

Inference (eval mode, no gradient, calibrated quantisers) follows TFLM's integer arithmetic exactly
for the input, every layer with one active candidate, and the other ops whose kind has an integer
executor (``ops.KINDS``: ADD, RELU, average pooling): integer
accumulators, the exporter's int32 bias, TFLM's fixed-point requantisation. A float32 forward
differs from it at rounding boundaries, and which samples flip depended on the CPU's float kernels.

Each weighted layer holds its candidates (``Precision``: weight bits, activation bits). Its output
mixes the candidates' quantised weights by softmax(alpha) over the *active* candidates; by
linearity of convolution, mixing the weights equals mixing the branch outputs. Where int16-activation
candidates (w8a16) are active among others, training mixes its int8 and int16 quantisations by
their softmax mass, so that alpha learns what the finer grid is worth. For the Shapley search,
``coalition_logits`` scores many coalitions of active candidates in one call, computing each
layer once per distinct prefix of choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from smpq_edge.common.distributed import SINGLE_PROCESS, Context
from smpq_edge.common.precision import WIDE, Precision
from smpq_edge.network.fixedpoint import (INT8_MAX, INT8_MIN, INT16_MAX, INT16_MIN, INT32_MAX, INT32_MIN,
                                          Requantiser, WideRequantiser)
from smpq_edge.network.graph import Graph, Op
from smpq_edge.network.ops import KINDS

# A float32 sum of integers is exact, in any order, while every partial sum stays below 2^24.
FLOAT32_EXACT = 2**24
# Inputs split as k = SPLIT * high + low (low in 0..SPLIT-1): two float32 convolutions whose sums
# stay exact where one would not, ten times faster than one in float64 on these CPUs.
SPLIT = 16


def weight_qmax(bits: int) -> int:
    """Symmetric weight range [-qmax, qmax]: 127 for int8, 7 for int4 (zero point 0)."""
    return 2 ** (bits - 1) - 1


def weight_scale(weight: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
    """Scale per output channel (dim 0 of a torch weight) or per tensor, from max |w|."""
    if per_channel:
        absmax = weight.detach().abs().flatten(1).amax(dim=1)
    else:
        absmax = weight.detach().abs().amax().reshape(1)
    return torch.clamp(absmax, min=1e-8) / weight_qmax(bits)


def fake_quant_weight(weight: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
    """Weights on the symmetric integer grid (torch's fused kernel; straight-through gradient)."""
    scale = weight_scale(weight, bits, per_channel)
    qmax = weight_qmax(bits)
    zero = torch.zeros(len(scale), dtype=torch.int32, device=weight.device)
    if per_channel:
        return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -qmax, qmax)
    return torch.fake_quantize_per_tensor_affine(weight, scale, zero, -qmax, qmax)


def quantize_weight(weight: torch.Tensor, bits: int, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer weights and their scales, read back from ``fake_quant_weight`` so the two agree."""
    scale = weight_scale(weight, bits, per_channel)
    shaped = scale.reshape(-1, *([1] * (weight.dim() - 1)))
    fake = fake_quant_weight(weight.detach(), bits, per_channel)
    return torch.round(fake / shaped).to(torch.int8), scale


@dataclass(frozen=True)
class ActivationParams:
    scale: float
    zero_point: int

    @property
    def tflite_scale(self) -> float:
        """The scale as the .tflite stores it (float32), which TFLM computes with."""
        return float(np.float32(self.scale))


def type_range(bits: int) -> tuple[int, int]:
    """The integers an int8 or int16 activation tensor holds."""
    return (INT16_MIN, INT16_MAX) if bits == 16 else (INT8_MIN, INT8_MAX)


def activation_range(p: ActivationParams, activation: str, bits: int = 8) -> tuple[int, int]:
    """CalculateActivationRangeQuantized: the fused activation's int8 (or int16) range, from the
    float32 scale."""
    lo, hi = type_range(bits)
    if activation in ("relu", "relu6"):
        lo = max(lo, p.zero_point)
    if activation == "relu6":
        six = float(np.float32(6.0) / np.float32(p.scale))
        hi = min(hi, p.zero_point + math.floor(six + 0.5))  # TfLiteRound of a positive value
    return lo, hi


class ActQuant(nn.Module):
    """Asymmetric int8 per-tensor fake quantiser with a running min/max range.

    The range always includes 0 (TFLite needs zero exactly representable). A tensor that TFLM
    holds in int16 (``bits`` 16: written by a 16x8 layer) is quantised symmetrically from the same
    range, zero point 0, as TFLite's 16x8 mode does. In training mode
    batches move the range by an exponential moving average, once per batch: forward
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
        self._pending: tuple[float, float] | None = None
        self.bits = 8  # the tensor's type in the exported model (QuantNet.set_activation_bits)

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

    def params(self, bits: int | None = None) -> ActivationParams:
        """The tensor's scale and zero point as an int8 tensor, or as int16 (``bits`` 16); its own
        type's by default."""
        lo, hi = float(self.lo), float(self.hi)
        if (bits or self.bits) == 16:
            return ActivationParams(max(-lo, hi, 1e-8) / INT16_MAX, 0)
        scale = max(hi - lo, 1e-8) / (INT8_MAX - INT8_MIN)
        zero_point = int(min(max(round(INT8_MIN - lo / scale), INT8_MIN), INT8_MAX))
        return ActivationParams(scale, zero_point)

    def forward(self, x: torch.Tensor, activation: str = "none", bits: int | None = None) -> torch.Tensor:
        """The fused activation (none, relu, relu6) applied to ``x``, then quantisation (as int8 or
        int16: ``bits``, the tensor's own type by default)."""
        bits = bits or self.bits
        initialised = bool(self.initialised)
        observes = x.numel() and (self.training or not initialised)
        if not observes and not torch.is_grad_enabled():
            return self._inference(x, activation, bits)
        x = apply_activation(x, activation)
        if observes:
            lo, hi = float(x.detach().min()), float(x.detach().max())
            if not initialised:
                self._update(lo, hi)  # the very first batch sets the range it is quantised with
            else:
                seen = self._pending or (lo, hi)
                self._pending = (min(seen[0], lo), max(seen[1], hi))
        p = self.params(bits)
        # torch's fused kernel: round half to even, clamp, dequantise; gradient straight through
        # inside the range and zero outside it.
        return torch.fake_quantize_per_tensor_affine(x, p.scale, p.zero_point, *type_range(bits))

    def _inference(self, x: torch.Tensor, activation: str, bits: int) -> torch.Tensor:
        """The same values as the fused kernel above, about twice as fast (one new tensor, then in
        place, no gradient mask) and with the activation folded into the clamp: relu(x) quantises
        to at least the zero point, relu6(x) to at most 6's level. Written by hand because the
        evaluation of Shapley coalitions spends a third of its time here. Float32 throughout,
        in the kernel's order (x * (1/scale), round, + zero point), so the values are identical."""
        p = self.params(bits)
        scale = np.float32(p.scale)
        inverse = np.float32(1.0) / scale
        lo, hi = type_range(bits)
        if activation in ("relu", "relu6"):
            lo = max(lo, p.zero_point)
        if activation == "relu6":
            hi = min(hi, int(np.rint(np.float32(6.0) * inverse)) + p.zero_point)
        q = x.mul(float(inverse)).round_()
        return q.clamp_(lo - p.zero_point, hi - p.zero_point).mul_(float(scale))

    def integers(self, x: torch.Tensor, bits: int | None = None) -> torch.Tensor:
        """x quantised as TFLM's quantiser does it (round(x / scale), half to even, in float32),
        less the zero point: on this quantiser's grid, the exact integers q - zero point."""
        return x.div(self.params(bits).tflite_scale).round_()

    def dequantise(self, k: torch.Tensor, activation: str = "none", bits: int | None = None) -> torch.Tensor:
        """Integers k = q - zero point (overwritten), q clamped to the fused activation's int8 (or
        int16) range, back on the float grid: k * scale in float32, as the float path writes them."""
        bits = bits or self.bits
        p = self.params(bits)
        lo, hi = activation_range(p, activation, bits)
        return k.to(torch.float32).clamp_(lo - p.zero_point, hi - p.zero_point).mul_(p.tflite_scale)

    def convert(self, x: torch.Tensor, bits: int, exact: bool) -> torch.Tensor:
        """The tensor (held in this quantiser's type) as the other type: TFLM's QUANTIZE between
        int8 and int16 (reference Requantize: (q - zero point) times the ratio of the float32
        scales, MultiplyByQuantizedMultiplier, plus the new zero point, clamped) when ``exact``,
        else a fake quantisation on the new grid."""
        source, target = self.params(), self.params(bits)
        if not exact:
            return torch.fake_quantize_per_tensor_affine(x, target.scale, target.zero_point, *type_range(bits))
        requantise = Requantiser.of_scales(np.array([source.tflite_scale / target.tflite_scale]), device=x.device)
        return self.dequantise(requantise(self.integers(x).to(torch.int64)), "none", bits)


def same_pad(x: torch.Tensor, op: Op) -> torch.Tensor:
    """``x`` padded with zeros (real 0, the zero point in integers) by the op's asymmetric SAME
    pads; the convolution after it runs unpadded, as TFLite's SAME does."""
    if not op.same_pads:
        return x
    top, left, bottom, right = op.same_pads
    return F.pad(x, (left, right, top, bottom))


def run_layer(op: Op, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A conv, depthwise or fully connected layer with torch-layout ``weight`` (asymmetric SAME
    pads applied first), in float or on integers held as floats."""
    if op.kind == "fc":
        return F.linear(x, weight, bias)
    return F.conv2d(same_pad(x, op), weight, bias, stride=op.stride, padding=op.padding, groups=op.groups)


@dataclass(frozen=True)
class IntegerLayer:
    """One candidate of a layer in TFLM's integer arithmetic (reference integer_ops/conv.h,
    depthwise_conv.h, fully_connected.h): the exact integer accumulator plus the exporter's int32
    bias, requantised per channel by TFLM's fixed-point multiplier, clamped to the fused
    activation's int8 range."""

    op: Op
    # Integers as float32, or as float64 where even split inputs could take a sum past 2^24.
    weight: torch.Tensor
    requantise: Requantiser | WideRequantiser  # with the int32 (16x8: int64) bias folded in
    source: ActQuant
    target: ActQuant
    split: bool = False  # whole inputs could pass 2^24: sum their high and low parts apart (SPLIT)
    bits: int = 8  # activations in and out: 16 for TFLM's 16x8 kernels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k = self.source.integers(x, self.bits)
        if self.split:
            high = k.div(SPLIT, rounding_mode="floor")
            low = k.sub_(high * SPLIT)
            acc = run_layer(self.op, high, self.weight).to(torch.int64).mul_(SPLIT)
            acc += run_layer(self.op, low, self.weight).to(torch.int64)
        else:
            acc = run_layer(self.op, k.to(self.weight.dtype), self.weight).to(torch.int64)
        return self.target.dequantise(self.requantise(acc), self.op.activation, self.bits)


@dataclass(frozen=True)
class MixedWeight:
    """What a layer runs with while several candidates are active: their softmax mix of quantised
    weights, and the softmax mass of its int16-activation candidates (0: int8 output only)."""

    weight: torch.Tensor
    wide_share: torch.Tensor | float = 0.0


class MixedLayer(nn.Module):
    """A conv, depthwise conv or fully connected layer with BatchNorm folded in, whose weights are
    fake-quantised at each candidate's weight bits and mixed by softmax(alpha) over active candidates."""

    def __init__(self, op: Op, weight: torch.Tensor, bias: torch.Tensor, candidates: tuple[Precision, ...]):
        super().__init__()
        self.op = op
        self.candidates = tuple(candidates)
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())
        self.alpha = nn.Parameter(torch.zeros(len(candidates)))
        self.wide_candidates = [k for k, c in enumerate(self.candidates) if c.wide]
        self.register_buffer("active", torch.ones(len(candidates), dtype=torch.bool))
        # Per-channel for conv and depthwise; per tensor for FC (TFLM's INT4 FC path needs it).
        self.per_channel = op.kind != "fc"

    def selects(self, chosen: Precision) -> list[bool]:
        """The active mask for ``chosen``: that candidate, or where it is not one (int16 activations
        set by hand in policy.json, w8a16 not a candidate) the candidate of its weights, which are
        the same weights."""
        mask = [c == chosen for c in self.candidates]
        if not any(mask):
            mask = [c == Precision(chosen.weights) for c in self.candidates]
        if not any(mask):
            raise ValueError(f"layer '{self.op.name}': {chosen.name} is not a candidate "
                             f"({', '.join(c.name for c in self.candidates)})")
        return mask

    def quantised_weight(self, bits: int) -> torch.Tensor:
        return fake_quant_weight(self.weight, bits, self.per_channel)

    def mix(self, active: torch.Tensor) -> torch.Tensor:
        """Softmax(alpha) restricted to the active candidates."""
        logits = self.alpha.masked_fill(~active, float("-inf"))
        return torch.softmax(logits, dim=-1)

    def mixed_weight(self, active: torch.Tensor) -> torch.Tensor:
        weights = self.mix(active)
        quantised = {c.weights: self.quantised_weight(c.weights) for k, c in enumerate(self.candidates) if bool(active[k])}
        return sum(weights[k] * quantised[c.weights] for k, c in enumerate(self.candidates) if bool(active[k]))

    def mixed(self, active: torch.Tensor) -> MixedWeight:
        """The mixed weight and the int16-activation candidates' share of the mix."""
        wide = [k for k in self.wide_candidates if bool(active[k])]
        share = self.mix(active)[wide].sum() if wide else 0.0
        return MixedWeight(self.mixed_weight(active), share)

    def forward_with(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer with the given (already quantised) weight; not named apply, which nn.Module owns."""
        # Training keeps the bias float (its int32 rounding is far below an output step);
        # inference with one candidate runs ``integer`` instead, with the exported int32 bias.
        return run_layer(self.op, x, weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with(x, self.mixed_weight(self.active))

    def integer(self, bits: int, source: ActQuant, target: ActQuant, activation_bits: int = 8) -> IntegerLayer:
        """Candidate ``bits`` with the numbers the exporter writes: integer weights, float32 scales,
        int32 bias round(bias / (input scale x weight scale)) in float64 (exporter._rewrite). With
        ``activation_bits`` 16, TFLM's 16x8 kernel: int16 in and out, int64 bias, the int64
        accumulator requantised by the reduced multiplier."""
        q, scales = quantize_weight(self.weight, bits, self.per_channel)
        w_scale = scales.detach().cpu().numpy().astype(np.float64)
        p_in, p_out = source.params(activation_bits), target.params(activation_bits)
        bias_scale = np.broadcast_to(float(p_in.scale) * w_scale, (len(self.bias),))
        bias = np.round(self.bias.detach().cpu().numpy().astype(np.float64) / bias_scale)
        # TFLM's effective scale from the float32 scales in the file, multiplied in double by the
        # conv kernels (PopulateConvolutionQuantizationParams) and, in TFLM 90b983c and the pinned
        # wheel, by fully connected too (GetQuantizedConvolutionMultipler; an older TFLM took the
        # product in float32, which flipped one ResNet-8 output by a step).
        product = p_in.tflite_scale * w_scale
        view = (-1,) if self.op.kind == "fc" else (-1, 1, 1)
        if activation_bits == 16:
            # int16 inputs times int8 weights: float64 sums are exact (far below 2^53).
            requantise = WideRequantiser.of_scales(product / p_out.tflite_scale, view, bias.astype(np.int64), q.device)
            return IntegerLayer(self.op, q.to(torch.float64), requantise, source, target, bits=16)
        bias = np.clip(bias, INT32_MIN, INT32_MAX)
        requantise = Requantiser.of_scales(product / p_out.tflite_scale, view, bias.astype(np.int64), q.device)
        k_max = max(INT8_MAX - p_in.zero_point, p_in.zero_point - INT8_MIN)
        weight_sum = float(q.abs().flatten(1).sum(1).max())
        if weight_sum * k_max < FLOAT32_EXACT:
            return IntegerLayer(self.op, q.to(torch.float32), requantise, source, target)
        # high parts reach -(k_max // SPLIT) - 1, low parts SPLIT - 1
        if weight_sum * max(k_max // SPLIT + 1, SPLIT - 1) < FLOAT32_EXACT:
            return IntegerLayer(self.op, q.to(torch.float32), requantise, source, target, split=True)
        return IntegerLayer(self.op, q.to(torch.float64), requantise, source, target)


def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the preceding convolution, as the TFLite converter does."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    factor = gamma / std
    folded_w = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
    base = bias if bias is not None else torch.zeros_like(bn.running_mean)
    return folded_w, (base - bn.running_mean) * factor + beta


def apply_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    """A fused activation (none, relu, relu6) in float: the graph's, the float module's and the exporter's."""
    if activation == "relu":
        return torch.relu(x)
    if activation == "relu6":
        return torch.clamp(x, 0.0, 6.0)
    return x


def activation_types(graph: Graph, wide: frozenset[str]) -> dict[str, int]:
    """Each op's output type in the exported model, 8 or 16 bits: a layer in ``wide`` writes int16
    (TFLM's 16x8 kernels), the ops that share their input's scale (pooling, reshape) keep their
    input's type, every other op writes int8 (its int8 kernel; ADD, RELU and SOFTMAX stay int8, so
    an int16 input reaches them through a QUANTIZE). Every op reads its inputs in its own output
    type, so an input held in the other type gets a QUANTIZE (int8 <-> int16) first."""
    types: dict[str, int] = {}
    for op in graph.ops:
        if op.weighted:
            types[op.name] = 16 if op.name in wide else 8
        elif KINDS[op.kind].shares_input_scale:
            types[op.name] = types[op.inputs[0]]
        else:
            types[op.name] = 8
    return types


class QuantNet(nn.Module):
    """The traced graph run with TFLite-faithful fake quantisation (see module docstring)."""

    def __init__(self, graph: Graph, source: nn.Module, candidates: Iterable[int | Precision]):
        """``candidates``: each layer's choices (weight bits ``b`` stand for w{b}a8)."""
        super().__init__()
        self.graph = graph
        self.candidates = tuple(sorted(Precision.of(c) for c in candidates))
        modules = dict(source.named_modules())
        self.layers = nn.ModuleDict()
        self.act = nn.ModuleDict()
        # Ops that keep their input's quantisation (TFLite requires the same scale in and out).
        self.shares_input_scale = {op.name for op in graph.ops if KINDS[op.kind].shares_input_scale}
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
        self.set_activation_bits(frozenset())

    @staticmethod
    def key(name: str) -> str:
        """ModuleDict keys cannot contain dots."""
        return name.replace(".", "__")

    def layer(self, name: str) -> MixedLayer:
        return self.layers[self.key(name)]

    def mixed_layers(self) -> list[MixedLayer]:
        return [self.layers[self.key(op.name)] for op in self.graph.layers]

    def quantiser_owner(self, name: str) -> str:
        """The op whose quantiser sets op ``name``'s output scale (its source's, for scale-sharing ops)."""
        while name in self.shares_input_scale:
            name = self.graph.op(name).inputs[0]
        return name

    def activation_quantiser(self, name: str) -> ActQuant:
        return self.act[self.key(self.quantiser_owner(name))]

    def commit_observations(self, context: Context = SINGLE_PROCESS) -> None:
        """End of a training batch: move every activation range by the batch's min and max."""
        for quantiser in self.act.values():
            quantiser.commit(context)

    def set_policy(self, policy: Mapping[str, int | Precision] | None) -> None:
        """Activate one candidate per layer (``policy``; weight bits ``b`` stand for w{b}a8) and
        its activation types, or all candidates (None) with int8 activations for the supernet."""
        chosen = {name: Precision.of(c) for name, c in (policy or {}).items()}
        for op in self.graph.layers:
            layer = self.layer(op.name)
            if policy is None:
                layer.active.fill_(True)
            else:
                layer.active.copy_(torch.tensor(layer.selects(chosen[op.name]), device=layer.active.device))
        self.set_activation_bits(frozenset(name for name, c in chosen.items() if c.wide))

    def set_activation_bits(self, wide: frozenset[str]) -> None:
        """Run the layers in ``wide`` with int16 activations (TFLM's 16x8 kernels), the rest int8."""
        self.wide = frozenset(wide)
        self.types = activation_types(self.graph, self.wide)
        for op in self.graph.ops:
            if op.name not in self.shares_input_scale:
                self.act[self.key(op.name)].bits = self.types[op.name]

    def _as_type(self, name: str, x: torch.Tensor, bits: int) -> torch.Tensor:
        """Tensor ``name`` as ``bits`` wide: itself, or through the QUANTIZE the exporter writes."""
        quantiser = self.activation_quantiser(name)
        if quantiser.bits == bits:
            return x
        exact = not self.training and not torch.is_grad_enabled() and bool(quantiser.initialised)
        return quantiser.convert(x, bits, exact)

    def _output(self, env: dict[str, torch.Tensor]) -> torch.Tensor:
        """The graph's output as the model gives it: int8 (an int16 one through a QUANTIZE)."""
        return self._as_type(self.graph.output, env[self.graph.output], 8)

    def players(self) -> list[tuple[str, Precision]]:
        """Shapley players: (layer, candidate) in layer order."""
        return [(op.name, bits) for op in self.graph.layers for bits in self.candidates]

    def _integer_mode(self, op: Op) -> bool:
        """Whether ``op`` runs TFLM's integer arithmetic: at inference (eval mode, no gradient) once
        the quantisers of its inputs and output are calibrated."""
        if self.training or torch.is_grad_enabled():
            return False
        return all(bool(self.activation_quantiser(name).initialised) for name in (op.name, *op.inputs))

    def _layer_weight(self, op: Op, active: torch.Tensor, activation_bits: int) -> MixedWeight | IntegerLayer:
        """What layer ``op`` runs with under ``active``: its one candidate in integers (with
        ``activation_bits`` activations) in integer mode, else the softmax mix of the active
        candidates."""
        layer = self.layer(op.name)
        if int(active.sum()) == 1 and self._integer_mode(op):
            chosen = layer.candidates[int(active.nonzero())]
            return layer.integer(chosen.weights, self.activation_quantiser(op.inputs[0]),
                                 self.activation_quantiser(op.name), activation_bits)
        return layer.mixed(active)

    def _execute(self, op: Op, inputs: list[torch.Tensor],
                 weight: MixedWeight | IntegerLayer | None = None) -> torch.Tensor:
        """One op on its (already quantised) inputs, then its fused activation and output quantiser.
        A layer runs with ``weight`` if given, else with its active candidates."""
        if op.inputs and self.wide:  # all int8 (the supernet, int8 policies): no type to convert
            inputs = [self._as_type(name, x, self.types[op.name]) for name, x in zip(op.inputs, inputs)]
        if op.weighted:
            if weight is None:
                weight = self._layer_weight(op, self.layer(op.name).active, self.types[op.name])
            if isinstance(weight, IntegerLayer):
                return weight(inputs[0])
            y = self.layer(op.name).forward_with(inputs[0], weight.weight)
            quantiser = self.activation_quantiser(op.name)
            out = quantiser(y, op.activation)
            if isinstance(weight.wide_share, float) or quantiser.bits == WIDE or not torch.is_grad_enabled():
                return out
            # int8 and int16 candidates mixed: their outputs mixed alike, for alpha's gradient only
            # (at inference the output stays on the int8 grid that the integer ops after it read).
            return out + weight.wide_share * (quantiser(y, op.activation, WIDE) - out)
        kind = KINDS[op.kind]
        target = self.activation_quantiser(op.name)
        if kind.integer is not None and self._integer_mode(op):
            # TFLM's integer kernel where it rounds differently from the float op on the grid.
            sources = [self.activation_quantiser(name) for name in op.inputs]
            exact = kind.integer(op, inputs, sources, target)
            if exact is not None:
                return exact
        return target(kind.run(op, inputs), op.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        whole = _Segment(self.graph.ops, frozenset({self.graph.output}))
        return self._output(self._run_segment(whole, {"": x}))

    @torch.no_grad()
    def coalition_logits(self, x: torch.Tensor, coalitions: np.ndarray,
                         on_leaf: Callable[[int], None] | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """Logits of batch ``x`` under each of C coalitions ((C, players) bool masks).

        Coalitions that agree on every layer up to some op have identical activations there. So
        the distinct coalitions are walked as a prefix tree over the layers, depth first: each
        layer runs once per distinct prefix of choices, always on one copy of the batch. That is
        the least work an exact evaluation can do, without gathering and scattering stacked
        copies of the batch (on a CPU those copies cost more than the shared layers saved,
        measured in bench/search_speed.py), and it holds one path of the tree in memory.
        Returns (logits (U, B, classes) of the U distinct coalitions, index (C,) coalition -> row).
        ``on_leaf(U)`` is called as each distinct coalition's logits are ready (for progress).
        """
        k = len(self.candidates)
        codes = (coalitions.reshape(len(coalitions), -1, k) * (1 << np.arange(k))).sum(axis=2)
        # np.unique sorts the rows, so coalitions sharing a prefix of layer choices are contiguous.
        distinct, index = np.unique(codes, axis=0, return_inverse=True)
        segments = self._segments()
        # Each layer's weight (mixed, or one candidate's integers) per distinct choice, once per
        # call, and whether that choice runs int16 activations (only int16 candidates active).
        weights, wide = {}, {}
        for depth, op in enumerate(self.graph.layers):
            for code in np.unique(distinct[:, depth]).tolist():
                active = torch.tensor([(code >> j) & 1 == 1 for j in range(k)], device=self.layer(op.name).alpha.device)
                wide[depth, code] = all(c.wide for c, on in zip(self.candidates, active.tolist()) if on)
                weights[depth, code] = self._layer_weight(op, active, WIDE if wide[depth, code] else 8)
        leaves: list[torch.Tensor] = []

        def leaf(logits: torch.Tensor) -> None:
            leaves.append(logits)
            if on_leaf is not None:
                on_leaf(len(distinct))

        policy_wide = self.wide
        self.set_activation_bits(frozenset())
        walk = _Walk(segments, weights, wide, leaf)
        try:
            self._descend(walk, 0, distinct, self._run_segment(segments[0], {"": x}), frozenset())
        finally:
            self.set_activation_bits(policy_wide)
        return torch.stack(leaves), index.reshape(-1)

    def _descend(self, walk: _Walk, depth: int, codes: np.ndarray, env: dict[str, torch.Tensor],
                 wide: frozenset[str]) -> None:
        """For each distinct choice of layer ``depth`` among ``codes`` (rows sharing the choices of
        the layers before it, so each choice is one contiguous run), run that layer's segment,
        then the child's subtree. ``wide``: the int16-activation layers before ``depth``; the
        tensors' types are set for the path's choices before each segment runs (a layer's choice
        sets the type of its output and of the scale-sharing ops after it, nothing before it)."""
        if depth == len(walk.segments) - 1:
            walk.leaf(self._output(env))
            return
        column = codes[:, depth].tolist()
        start = 0
        for stop in range(1, len(column) + 1):
            if stop == len(column) or column[stop] != column[start]:
                choice = column[start]
                child_wide = wide | {self.graph.layers[depth].name} if walk.wide[depth, choice] else wide
                if child_wide != self.wide:
                    self.set_activation_bits(child_wide)
                child = self._run_segment(walk.segments[depth + 1], env, walk.weights[depth, choice])
                self._descend(walk, depth + 1, codes[start:stop], child, child_wide)
                start = stop

    def _segments(self) -> list[_Segment]:
        """The ops before the first layer, then per layer the ops from it up to the next layer,
        each with the names of the tensors that ops after it (or the output) still read."""
        groups: list[list[Op]] = [[]]
        for op in self.graph.ops:
            if op.weighted:
                groups.append([])
            groups[-1].append(op)
        segments, done = [], 0
        for ops in groups:
            done += len(ops)
            later = {name for op in self.graph.ops[done:] for name in op.inputs}
            segments.append(_Segment(ops, frozenset(later | {self.graph.output})))
        return segments

    def _run_segment(self, segment: _Segment, env: dict[str, torch.Tensor],
                     weight: MixedWeight | IntegerLayer | None = None) -> dict[str, torch.Tensor]:
        """A segment's ops on a copy of ``env`` (a layer gets ``weight``; the input op reads
        ``env[""]``), keeping only the tensors still read later."""
        env = dict(env)
        for op in segment.ops:
            inputs = [env[name] for name in op.inputs] if op.inputs else [env[""]]
            env[op.name] = self._execute(op, inputs, weight if op.weighted else None)
        return {name: tensor for name, tensor in env.items() if name in segment.read_later}


@dataclass(frozen=True)
class _Segment:
    ops: list[Op]
    read_later: frozenset[str]


@dataclass(frozen=True)
class _Walk:
    """What the prefix-tree walk of ``coalition_logits`` reads at every node: per (layer index,
    choice code) the layer's weight and whether it runs int16 activations; and the leaf callback."""

    segments: list[_Segment]
    weights: dict[tuple[int, int], MixedWeight | IntegerLayer]
    wide: dict[tuple[int, int], bool]
    leaf: Callable[[torch.Tensor], None]
