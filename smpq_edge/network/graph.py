"""The model as TFLite will see it: a list of ops in execution order, traced from a torch module.

Tracing (torch.fx) plus shape propagation turns a user's module into plain ``Op`` records:
BatchNorm is folded into the convolution before it and a ReLU/ReLU6 is fused into the op
that feeds it, exactly as the TFLite converter does, so the layer list, the cost model, the
quantised supernet and the exporter all count the same layers. Anything TFLM cannot run as
int8 stops here with the layer's name.
"""

from __future__ import annotations

import contextlib
import io
import math
import operator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from smpq_edge.common.errors import UserError
from smpq_edge.inputs.models.layers import SameConv2d
from smpq_edge.network.ops import WEIGHTED_KINDS, OpKind, supported_torch, traceable_modules, traced_kind
from smpq_edge.common.vocabulary import Activation, OpKindName

# Folded or aliased by the tracer itself; the other modules are the op kinds' (ops.KINDS).
_OWN_MODULES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.Dropout, nn.Identity)


def layer_name(module_path: str, kind: str) -> str:
    """A weighted layer's name: its module path, with the kind in front where the path is only
    numbers (an ``nn.Sequential``'s children), so that a report says "fc4", not "4"."""
    return f"{kind}{module_path}" if module_path.replace(".", "").isdigit() else module_path


@dataclass
class Op:
    """One TFLite operator. Shapes are per sample, channels first: (C, H, W) or (F,)."""

    name: str
    kind: OpKindName  # a key of ops.KINDS
    inputs: tuple[str, ...]
    out_shape: tuple[int, ...]
    activation: Activation = "none"  # fused into this op
    module: str = ""  # path of the torch module that holds the weights
    bn_module: str = ""  # path of the BatchNorm folded into it
    weight_shape: tuple[int, ...] = ()
    has_bias: bool = False
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    # TensorFlow's SAME padding (top, left, bottom, right) when it is asymmetric, as for stride 2
    # on an even size: executors pad explicitly (``padding`` is then (0, 0)) and TFLite gets SAME.
    same_pads: tuple[int, ...] = ()
    kernel: tuple[int, int] = (1, 1)  # pooling window

    @property
    def weighted(self) -> bool:
        return self.kind in WEIGHTED_KINDS

    @property
    def out_elements(self) -> int:
        return math.prod(self.out_shape)

    @property
    def weight_count(self) -> int:
        return math.prod(self.weight_shape) if self.weight_shape else 0

    @property
    def groups(self) -> int:
        """Convolution groups: one per channel for a depthwise layer, else one."""
        return self.out_channels if self.kind == "depthwise" else 1

    @property
    def out_channels(self) -> int:
        if not self.weight_shape:
            return 0
        # TFLite filters: conv OHWI, depthwise [1, H, W, C], fully connected [out, in].
        return self.weight_shape[-1] if self.kind == "depthwise" else self.weight_shape[0]

    @property
    def macs(self) -> int:
        if self.kind == "fc":
            return self.weight_count
        if self.kind in ("conv", "depthwise"):
            spatial = self.out_elements // self.out_shape[0]
            return self.weight_count * spatial
        return 0


@dataclass
class Graph:
    ops: list[Op]
    input_shape: tuple[int, ...]
    output: str
    consumers: dict[str, list[str]] = field(default_factory=dict)
    # The exported model ends in TFLM's SOFTMAX after ``output`` (ModelSource.output_softmax):
    # not an op here, since nothing that trains or scores runs it; the cost model prices it.
    output_softmax: bool = False

    def op(self, name: str) -> Op:
        return self._by_name[name]

    def __post_init__(self) -> None:
        self._by_name = {op.name: op for op in self.ops}
        self.consumers = {op.name: [] for op in self.ops}
        for op in self.ops:
            for source in op.inputs:
                self.consumers[source].append(op.name)

    @property
    def layers(self) -> list[Op]:
        """The quantisable layers, in execution order."""
        return [op for op in self.ops if op.weighted]

    def to_dict(self) -> dict:
        return {"input_shape": list(self.input_shape), "output": self.output, "output_softmax": self.output_softmax,
                "ops": [asdict(op) for op in self.ops]}


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, nn.ReLU):
            return "relu"
        if isinstance(module, nn.ReLU6) or (
            isinstance(module, nn.Hardtanh) and (module.min_val, module.max_val) == (0.0, 6.0)
        ):
            return "relu6"
    if node.op in ("call_function", "call_method") and node.target in (torch.relu, F.relu, "relu"):
        return "relu"
    if node.op == "call_function" and node.target is F.relu6:
        return "relu6"
    return None


def _is_shape_query(node: fx.Node) -> bool:
    """``x.size(...)``, ``x.shape`` or an item of either: a batch size for a flatten, not a tensor."""
    if node.op == "call_method" and node.target == "size":
        return True
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] == "shape"
    if node.op == "call_function" and node.target is operator.getitem:
        return isinstance(node.args[0], fx.Node) and _is_shape_query(node.args[0])
    return False




def _unsupported_layer(node: fx.Node, module: nn.Module) -> UserError:
    return UserError(f"layer '{node.target}' ({type(module).__name__}) is not supported; "
                     f"supported: {supported_torch()}")


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer, with SameConv2d kept whole like the torch.nn layers it extends."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, SameConv2d) or super().is_leaf_module(module, qualified_name)


class _Tracer:
    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]):
        self.modules = dict(model.named_modules())
        try:
            self.gm = fx.GraphModule(model, _LeafTracer().trace(model))
        except Exception as exc:  # fx raises many types; the message is what the user needs
            raise UserError(f"model cannot be traced (data-dependent control flow?): {str(exc).splitlines()[0]}") from None
        self._check_layers()  # before ShapeProp runs the model
        example = torch.zeros(1, *input_shape)
        try:
            # ShapeProp prints the traceback of a failing node itself; the user gets one line instead.
            with contextlib.redirect_stderr(io.StringIO()):
                ShapeProp(self.gm).propagate(example)
        except Exception as exc:
            cause = exc.__cause__ or exc  # ShapeProp wraps the real error (e.g. a shape mismatch)
            message = (str(cause).strip().splitlines() or [cause.__class__.__name__])[0]
            raise UserError(f"model does not accept input of shape {tuple(input_shape)}: {message}") from None
        self.ops: list[Op] = []
        self.alias: dict[str, str] = {}  # fx node name -> name of the op whose output it is
        # A size query reads no values: it does not stop a ReLU or BatchNorm folding into its input.
        self.users = {node.name: sum(not _is_shape_query(user) for user in node.users) for node in self.gm.graph.nodes}

    def _source(self, arg) -> str:
        if not isinstance(arg, fx.Node):
            raise UserError(f"unsupported constant operand {arg!r} in the model's graph")
        return self.alias[arg.name]

    def _shape(self, node: fx.Node) -> tuple[int, ...]:
        return tuple(node.meta["tensor_meta"].shape[1:])

    def _emit(self, node: fx.Node, op: Op) -> None:
        self.ops.append(op)
        self.alias[node.name] = op.name

    def _last_producer(self, source: str) -> Op:
        return next(op for op in reversed(self.ops) if op.name == source)

    def _layer(self, node: fx.Node, module: nn.Module) -> Op:
        source = self._source(node.args[0])
        if isinstance(module, nn.Linear):
            return Op(layer_name(node.target, "fc"), "fc", (source,), self._shape(node), module=node.target,
                      weight_shape=tuple(module.weight.shape), has_bias=module.bias is not None)
        if module.padding_mode != "zeros":
            raise UserError(f"layer '{node.target}': padding mode {module.padding_mode!r} is not supported")
        if _pair(module.dilation) != (1, 1):
            raise UserError(f"layer '{node.target}': dilated convolution is not supported")
        c_in, c_out, groups = module.in_channels, module.out_channels, module.groups
        if groups == 1:
            kind = "conv"
            # TFLite's conv filter is OHWI.
            o, i, h, w = module.weight.shape
            weight_shape = (o, h, w, i)
        elif groups == c_in and c_out == c_in:
            kind = "depthwise"
            o, _, h, w = module.weight.shape
            weight_shape = (1, h, w, o)
        else:
            raise UserError(f"layer '{node.target}': grouped convolution (groups={groups}) has no TFLM int4 kernel; "
                            "use groups=1 or depthwise (groups = in = out channels)")
        if isinstance(module.padding, str):  # "valid" or "same" (stride 1 only, in torch)
            padding = tuple(k // 2 for k in module.kernel_size) if module.padding == "same" else (0, 0)
        else:
            padding = _pair(module.padding)
        same_pads = tuple(module.same_pads) if isinstance(module, SameConv2d) else ()
        return Op(layer_name(node.target, kind), kind, (source,), self._shape(node), module=node.target,
                  weight_shape=weight_shape, has_bias=module.bias is not None, stride=_pair(module.stride),
                  padding=padding, same_pads=same_pads)

    def _sole_reader(self, source: str) -> bool:
        """Whether op ``source``'s output has exactly one reader, looking through the nodes that
        alias it (Dropout, Identity, a folded BatchNorm or fused ReLU: each reads it once itself),
        so that folding into ``source`` cannot change what another reader sees."""
        group = [name for name, op_name in self.alias.items() if op_name == source]
        return sum(self.users[name] for name in group) - (len(group) - 1) == 1

    def _fold_batchnorm(self, node: fx.Node) -> None:
        source = self.alias[node.args[0].name]
        producer = self._last_producer(source)
        if producer.kind not in ("conv", "depthwise") or producer.bn_module or producer.activation != "none" \
                or not self._sole_reader(source):
            raise UserError(f"layer '{node.target}': BatchNorm2d must directly follow a convolution to be folded")
        producer.bn_module = node.target
        self.alias[node.name] = source

    def _fuse_or_emit_relu(self, node: fx.Node, kind: str) -> None:
        source = self.alias[node.args[0].name]
        producer = self._last_producer(source)
        if producer.kind in ("conv", "depthwise", "fc", "add") and producer.activation == "none" \
                and self._sole_reader(source):
            producer.activation = kind
            self.alias[node.name] = source
        else:
            self._emit(node, Op(node.name, "relu", (source,), self._shape(node), activation=kind))

    def _check_layers(self) -> None:
        """The first layer TFLM cannot run is the error, not the reshaping some code does to feed it
        (an LSTM's squeeze) nor a shape it gets wrong."""
        supported = (*_OWN_MODULES, *traceable_modules())
        for node in self.gm.graph.nodes:
            if node.op == "call_module" and _is_relu(node, self.modules) is None:
                module = self.modules[node.target]
                if not isinstance(module, supported):
                    raise _unsupported_layer(node, module)

    def run(self) -> Graph:
        output = None
        for node in self.gm.graph.nodes:
            if _is_shape_query(node):
                continue  # read only by the reshape it sizes, which takes its shape from ShapeProp
            if node.op == "placeholder":
                self._emit(node, Op("input", "input", (), self._shape(node)))
            elif node.op == "output":
                output = self._source(node.args[0])
            elif (relu := _is_relu(node, self.modules)) is not None:
                self._fuse_or_emit_relu(node, relu)
            elif node.op == "call_module":
                self._module(node, self.modules[node.target])
            elif node.op in ("call_function", "call_method"):
                self._function(node)
            else:
                raise UserError(f"model graph node '{node.name}' ({node.op}) is not supported")
        if output is None or len(self._shape_of_output()) != 1:
            raise UserError(f"model output must be (N, classes) logits, got per-sample shape {self._shape_of_output()}")
        return Graph(self.ops, self.ops[0].out_shape, output)

    def _shape_of_output(self) -> tuple[int, ...]:
        out = next(n for n in self.gm.graph.nodes if n.op == "output")
        arg = out.args[0]
        return self._shape(arg) if isinstance(arg, fx.Node) else ()

    def _module(self, node: fx.Node, module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            self._emit(node, self._layer(node, module))
        elif isinstance(module, nn.BatchNorm2d):
            self._fold_batchnorm(node)
        elif isinstance(module, (nn.Dropout, nn.Identity)):
            self.alias[node.name] = self._source(node.args[0])
        elif (kind := traced_kind(node, module)) is not None:
            self._emit_kind(node, kind, module)
        else:
            raise _unsupported_layer(node, module)

    def _function(self, node: fx.Node) -> None:
        if (kind := traced_kind(node, None)) is not None:
            self._emit_kind(node, kind, None)
        elif node.target is getattr:  # x.dtype, x.device, ...: the sizes are handled above
            raise UserError(f"model graph node '{node.name}': shape-dependent code is not supported")
        else:
            name = getattr(node.target, "__name__", str(node.target))
            raise UserError(f"operation '{name}' (graph node '{node.name}') is not supported; "
                            f"supported: {supported_torch()}")

    def _emit_kind(self, node: fx.Node, kind: OpKind, module: nn.Module | None) -> None:
        """An op of a kind with a torch form (ops.KINDS): its tensor operands, shape and fields."""
        sources = tuple(self._source(a) for a in node.args[:kind.torch.arity])
        self._emit(node, Op(node.name, kind.name, sources, self._shape(node), **kind.torch.fields(node, module)))


def trace(model: nn.Module, input_shape: tuple[int, ...], output_softmax: bool = False) -> Graph:
    """The TFLite-shaped op list of ``model`` for one sample of ``input_shape`` (C, H, W);
    ``output_softmax`` marks a model exported with a final SOFTMAX (see ``Graph``)."""
    was_training = model.training
    model.eval()
    try:
        graph = _Tracer(model, tuple(input_shape)).run()
    finally:
        model.train(was_training)
    if not graph.layers:
        raise UserError("model has no Conv2d or Linear layer to quantise")
    graph.output_softmax = output_softmax
    return graph
