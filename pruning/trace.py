"""Derive a model's pruning dataflow (`models.meta.ModelMeta`) from its torch.fx graph.

The zoo declares its dataflow by hand (`model.softprune_meta`); any other CNN built from
Conv2d + BatchNorm, element-wise activations, pooling, residual adds and a linear classifier gets
the same description here, read off `torch.fx.symbolic_trace` with channel counts from one
`ShapeProp` pass. Every tensor is followed as a *channel space*: a conv's output opens one, a BN
or activation or pooling keeps it, a residual add merges the spaces it adds (a stream), and an
option-A shortcut (`ShortcutA`, or `F.pad` on the channel dim) opens a child space whose channels
come from a parent's. A `torch.cat` on the channel dim opens a space made of its parts' channels.
A depthwise conv, a BatchNorm on a stream or concat, and a squeeze-excite excitation (a conv or
linear without BatchNorm whose output multiplies a feature map) *follow* the space they act on:
they keep it, and are cut with it. A grouped conv keeps all its channels and freezes the space it
reads; so does a conv without BatchNorm that only feeds such gates (an SE squeeze). Anything else
raises one ValueError naming the fx node, never a guess.

Conventions that make a traced meta equal to a declared one: convs in forward order except that a
block's projection conv is listed after its main branch; a block's input is a stream even when
nothing is added to it yet (its producers are kept full width under `sfp`); streams are named
after the module that holds the blocks writing them ("layer2"), or "stem".
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from models.layers import Scatter, ShortcutA
from models.meta import BlockMeta, ConcatMeta, ModelMeta

_LEAVES = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, ShortcutA, Scatter)
# Modules and functions that act on each channel alone: they keep the channel space.
_KEEP_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish,
                 nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.Hardtanh, nn.Dropout, nn.Dropout2d, nn.Identity,
                 nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_KEEP_FUNCTIONS = {F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish, F.mish,
                   torch.relu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.hardtanh, F.dropout,
                   F.hardsigmoid,
                   F.dropout2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                   F.adaptive_max_pool2d, torch.clone}
_KEEP_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous", "clone"}
_ADD = {operator.add, operator.iadd, torch.add}
_MUL = {operator.mul, operator.imul, torch.mul, operator.truediv, torch.div}
_CAT = {torch.cat, torch.concat, torch.stack}
_SHAPE_METHODS = {"size", "dim"}


class _Tracer(fx.Tracer):
    """Convs, BNs, linears and the zoo's shortcut layers stay single nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


def graph_module(model: nn.Module) -> fx.GraphModule:
    """`model` traced with the tracer the meta is derived with (leaves shared with `model`)."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises TraceError, TypeError, NotImplementedError, ...
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{type(model).__name__} cannot be traced by torch.fx ({type(e).__name__}: "
                         f"{line}); attach softprune_meta by hand instead") from None
    return fx.GraphModule(model, graph)


@dataclass
class _Space:
    """A set of channels: the output of one conv, or several merged by residual adds."""

    width: int
    convs: list[str] = field(default_factory=list)  # producers
    readers: list[str] = field(default_factory=list)
    parent: int | None = None  # option-A: the space its channels come from
    parent_map: list[tuple[int, int]] = field(default_factory=list)
    stream: bool = False
    parts: list[int] = field(default_factory=list)  # a concat: its parts' spaces, in order
    cat: str | None = None  # a concat: the fx node that made it (its name in the meta)


@dataclass(frozen=True)
class _Val:
    """What flows along one fx node. kind: image | space | fixed (a linear's output) | aux
    (shapes, scalars)."""

    kind: str
    space: int | None = None
    pending: str | None = None  # the conv whose output this is, before its BatchNorm
    flat: bool = False  # (N, C): spatial dims pooled and flattened away
    linear: str | None = None  # for kind fixed: the linear that produced it


@dataclass
class _Block:
    convs: list[str]
    shortcut: str
    downsample: str | None
    stream_in: int
    stream_out: int
    shortcut_module: str | None = None


class _Flow:
    """One pass over the graph in topological order."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.modules = dict(gm.named_modules())
        self.spaces: list[_Space] = []
        self.root: list[int] = []
        self.vals: dict[fx.Node, _Val] = {}
        self.convs: list[str] = []  # forward order
        self.bn: dict[str, str] = {}
        self.reads: dict[str, int | None] = {}  # conv -> space it reads (None: the image)
        self.blocks: list[_Block] = []
        self.first_conv: str | None = None
        self.classifier: str | None = None
        self.image_seen = False
        self.deferred: ValueError | None = None
        self.follow: dict[str, int] = {}  # follower module -> the space it follows
        self.fixed: set[str] = set()  # grouped convs: every output channel kept
        self.gates: set[str] = set()  # excitation convs/linears (followers too)
        self.frozen: set[int] = set()  # spaces read by a grouped conv
        self.pending_reads: list[tuple[fx.Node, str, str]] = []  # (node, reader, conv before its BN)
        self.out_space: dict[str, int] = {}  # conv -> the space its output opened

    # -- spaces ---------------------------------------------------------------------------
    def new_space(self, width: int, **kw) -> int:
        self.spaces.append(_Space(width, **kw))
        self.root.append(len(self.root))
        return len(self.root) - 1

    def find(self, s: int) -> int:
        while self.root[s] != s:
            s = self.root[s]
        return s

    def merge(self, node: fx.Node, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        sa, sb = self.spaces[a], self.spaces[b]
        if sa.parts or sb.parts:
            raise _err(node, "adds a channel concatenation to another tensor, which is not supported")
        if sa.width != sb.width:
            raise _err(node, f"adds {sa.width} channels to {sb.width}")
        if sa.parent is not None and sb.parent is not None:
            raise _err(node, "adds two option-A shortcuts")
        keep, gone = (b, a) if sb.parent is not None else (a, b)
        sk, sg = self.spaces[keep], self.spaces[gone]
        sk.convs += sg.convs
        sk.readers += sg.readers
        sk.stream = True
        self.root[gone] = keep
        return keep

    def fresh_conv(self, s: int) -> str | None:
        """The conv whose output space `s` is, if nothing has been merged into it."""
        sp = self.spaces[self.find(s)]
        return sp.convs[0] if len(sp.convs) == 1 and not sp.stream and sp.parent is None else None

    # -- values ---------------------------------------------------------------------------
    def val(self, node: fx.Node, arg) -> _Val:
        if not isinstance(arg, fx.Node):
            return _Val("aux")
        return self.vals[arg]

    def tensor_in(self, node: fx.Node, arg, what: str) -> _Val:
        """The channel space `arg` carries, checked as the input of a reader/merger `what`."""
        v = self.val(node, arg)
        if v.kind != "space":
            src = "the model input" if v.kind == "image" else "a non-conv value"
            raise _err(node, f"{what} reads {src}, which the tracer cannot follow here")
        if v.pending:  # fine for a conv that ends up fixed or a follower: checked at the end
            self.pending_reads.append((node, what, v.pending))
        return v

    def defer(self, node: fx.Node, why: str) -> None:
        """Report `why` at the end, unless an unsupported op further on is met first: that is
        the more useful message (an SE block's BN-less convs feed a gate; a cat's branches each
        read the input)."""
        if self.deferred is None:
            self.deferred = _err(node, why)

    def read(self, node: fx.Node, reader: str, arg, flat: bool) -> int | None:
        v = self.val(node, arg)
        if v.kind == "image":
            if self.first_conv is not None or not isinstance(self.modules[reader], nn.Conv2d):
                self.defer(node, "a second layer reads the model input; only one conv may")
            self.first_conv = self.first_conv or reader
            return None
        v = self.tensor_in(node, arg, f"'{reader}'")
        if v.flat != flat:
            raise _err(node, "reads a tensor of the wrong rank for its channels")
        self.spaces[self.find(v.space)].readers.append(reader)
        return v.space


def _err(node: fx.Node, why: str) -> ValueError:
    target = getattr(node.target, "__name__", None) or str(node.target)
    if node.op == "call_function":
        mod = getattr(node.target, "__module__", None) or ""
        target = f"{mod.replace('torch._C._VariableFunctions', 'torch')}.{target}".lstrip(".")
        target = target.replace("_operator.", "operator.")
    return ValueError(f"trace: node '{node.name}' ({node.op} {target}): {why}")


def _shape(node: fx.Node) -> tuple[int, ...]:
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else ()


# -- per-node rules ---------------------------------------------------------------------------

def _module(flow: _Flow, node: fx.Node) -> _Val:
    name, mod = node.target, flow.modules[node.target]
    x = node.args[0] if node.args else None
    if isinstance(mod, Scatter):
        raise _err(node, "the model is already compacted (Scatter); trace the original model")
    if isinstance(mod, nn.Conv2d):
        if mod.groups != 1:
            return _grouped(flow, node, name, mod, x)
        flow.reads[name] = flow.read(node, name, x, flat=False)
        flow.convs.append(name)
        flow.out_space[name] = flow.new_space(mod.out_channels, convs=[name])
        return _Val("space", flow.out_space[name], pending=name)
    if isinstance(mod, nn.Linear):
        v = flow.val(node, x)
        if v.kind == "space":
            flow.read(node, name, x, flat=True)
            width = flow.spaces[flow.find(v.space)].width
            if mod.in_features != width:
                raise _err(node, f"reads {mod.in_features} features of {width} channels: only one "
                                 "feature per channel (pool to 1x1 before flattening) is supported")
        elif v.kind != "fixed":
            raise _err(node, "a linear layer reads the model input")
        return _Val("fixed", linear=name)
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        v = flow.val(node, x)
        if v.kind == "fixed":
            return v
        if v.kind != "space":
            raise _err(node, "BatchNorm on the model input is not supported")
        if v.pending is None:  # on a stream, a concat or a follower's BN output: it follows
            flow.follow[name] = v.space
            return v
        flow.bn[v.pending] = name
        return _Val("space", v.space, flat=v.flat)
    if isinstance(mod, ShortcutA):
        v = flow.tensor_in(node, x, "an option-A shortcut")
        _not_concat(flow, node, v)
        return _Val("space", flow.new_space(mod.width, parent=v.space, parent_map=list(zip(mod.src, mod.dst))))
    if isinstance(mod, _KEEP_MODULES):
        return flow.val(node, x)
    if isinstance(mod, nn.Flatten):
        return _flatten(flow, node, x)
    raise _err(node, f"module type {type(mod).__name__} is not supported")


def _grouped(flow: _Flow, node: fx.Node, name: str, mod: nn.Conv2d, x) -> _Val:
    """A depthwise conv (one filter per input channel) follows its input's channels; any other
    grouped conv keeps all its channels and freezes the space it reads (cutting it would need
    equal cuts in every group)."""
    v = flow.tensor_in(node, x, f"grouped conv '{name}'")
    if v.flat:
        raise _err(node, "reads a tensor of the wrong rank for its channels")
    if mod.groups == mod.in_channels == mod.out_channels:
        flow.follow[name] = v.space
        return _Val("space", v.space, pending=name)
    flow.frozen.add(v.space)
    flow.fixed.add(name)
    flow.reads[name] = flow.read(node, name, x, flat=False)
    flow.convs.append(name)
    flow.out_space[name] = flow.new_space(mod.out_channels, convs=[name])
    return _Val("space", flow.out_space[name], pending=name)


def _not_concat(flow: _Flow, node: fx.Node, v: _Val) -> None:
    if flow.spaces[flow.find(v.space)].parts:
        raise _err(node, "an option-A shortcut of a channel concatenation is not supported")


def _cat(flow: _Flow, node: fx.Node) -> _Val:
    """torch.cat on the channel dim: a space whose channels are its parts' channels in order."""
    if node.target is torch.stack:
        raise _err(node, "stacking tensors into a new dim is not supported")
    parts = node.args[0] if node.args else node.kwargs["tensors"]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    vals = [flow.tensor_in(node, t, "a concatenation") for t in parts]
    flat = vals[0].flat
    if any(v.flat != flat for v in vals) or not isinstance(dim, int) or dim % (2 if flat else 4) != 1:
        raise _err(node, "only concatenation along the channel dim (1) is supported")
    widths = [flow.spaces[flow.find(v.space)].width for v in vals]
    shape = _shape(node)
    if len(shape) < 2 or shape[1] != sum(widths):
        raise _err(node, f"concatenates {sum(widths)} channels into {shape[1:2] or '?'}")
    return _Val("space", flow.new_space(sum(widths), parts=[v.space for v in vals], cat=node.name), flat=flat)


def _gate_of(flow: _Flow, v: _Val) -> tuple[str, int] | None:
    """(module, width) if `v` is an excitation: a linear's output, or a conv's output that no
    BatchNorm has followed."""
    if v.kind == "fixed" and v.linear is not None:
        return v.linear, flow.modules[v.linear].out_features
    if v.kind == "space" and v.pending is not None and v.pending not in flow.follow \
            and flow.fresh_conv(v.space) == v.pending:
        return v.pending, flow.spaces[flow.find(v.space)].width
    return None


def _gate(flow: _Flow, node: fx.Node, a, b) -> _Val:
    """x * gate: squeeze-excite. The excitation's channel i scales channel i of x, so it
    follows x's space; the product is x's space."""
    for x, g in ((a, b), (b, a)):
        vx, gate = flow.val(node, x), _gate_of(flow, flow.val(node, g))
        if gate is None or vx.kind != "space" or gate[0] in flow.gates:
            continue
        vx = flow.tensor_in(node, x, "a gated tensor")
        width = flow.spaces[flow.find(vx.space)].width
        if gate[1] != width:
            raise _err(node, f"gates {width} channels with {gate[1]} excitations")
        flow.gates.add(gate[0])
        flow.follow[gate[0]] = vx.space
        return _Val("space", vx.space, vx.pending, flat=vx.flat)
    raise _err(node, "multiplies two feature maps: only squeeze-excite gating (x * gate, the gate "
                     "made by a conv or linear without BatchNorm) is supported")


def _flatten(flow: _Flow, node: fx.Node, x) -> _Val:
    v = flow.val(node, x)
    if v.kind != "space":
        return v
    width = flow.spaces[flow.find(v.space)].width
    shape = _shape(node)
    if len(shape) != 2 or shape[1] != width:
        raise _err(node, f"flattens {width} channels into {shape[1:] or '?'} features: only one "
                         "feature per channel (pool to 1x1 first) is supported")
    return _Val("space", v.space, v.pending, flat=True)


def _reshape(flow: _Flow, node: fx.Node, x) -> _Val:
    v = flow.val(node, x)
    if v.kind != "space" or _shape(node) == _shape(x):
        return v
    return _flatten(flow, node, x)


def _spatial_index(flow: _Flow, node: fx.Node) -> _Val:
    """x[:, :, ::2, ::2] keeps the channels; anything touching dims 0/1 is not followed."""
    x, idx = node.args
    v = flow.val(node, x)
    if v.kind in ("aux", "fixed"):
        return _Val("aux") if v.kind == "aux" else v
    idx = idx if isinstance(idx, tuple) else (idx,)
    if len(idx) >= 2 and all(isinstance(i, slice) and i == slice(None) for i in idx[:2]) \
            and all(isinstance(i, slice) for i in idx[2:]):
        return v
    raise _err(node, "indexing that selects batch entries or channels is not supported")


def _pad(flow: _Flow, node: fx.Node) -> _Val:
    """F.pad: spatial padding keeps the channels; zero channel padding is an option-A shortcut."""
    x, pad = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    v = flow.tensor_in(node, x, "a padding")
    pad = tuple(pad)
    if len(pad) >= 6:
        _not_concat(flow, node, v)
    front, back = (pad[4], pad[5]) if len(pad) >= 6 else (0, 0)
    if front == back == 0 and len(pad) <= 4:
        return v
    if mode != "constant" or value not in (None, 0, 0.0) or len(pad) != 6 or v.flat:
        raise _err(node, "only zero padding of the channel dim (an option-A shortcut) is supported")
    width = flow.spaces[flow.find(v.space)].width
    return _Val("space", flow.new_space(width + front + back, parent=v.space,
                                        parent_map=[(c, c + front) for c in range(width)]))


def _mean(flow: _Flow, node: fx.Node) -> _Val:
    x = node.args[0]
    v = flow.val(node, x)
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
    if v.kind != "space" or v.flat or sorted(d % 4 for d in dims) != [2, 3]:
        raise _err(node, "only a mean over the spatial dims (2, 3) is supported")
    return _Val("space", v.space, v.pending, flat=not keep)


def _binary(flow: _Flow, node: fx.Node, op: str) -> _Val:
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    tensors = [t for t in (a, b) if isinstance(t, fx.Node) and flow.vals[t].kind != "aux"]
    if len(tensors) < 2:  # x + 1, x * 0.5: per-channel, keeps the space
        return flow.val(node, tensors[0]) if tensors else _Val("aux")
    if op == "mul":
        return _gate(flow, node, a, b)
    if node.kwargs.get("alpha", 1) != 1:
        raise _err(node, "a scaled residual add (alpha) is not supported")
    return _residual(flow, node, a, b)


def _chain(flow: _Flow, last: str, target: int) -> list[str] | None:
    """The convs from the one reading space `target` to `last`, each reading only the previous
    conv's own output; None if `last` does not lead back to `target` that way."""
    chain, conv = [last], last
    while True:
        src = flow.reads[conv]
        if src is None:
            return None
        if flow.find(src) == flow.find(target):
            return chain
        conv = flow.fresh_conv(src)
        if conv is None:
            return None
        chain.insert(0, conv)


def _readings(flow: _Flow, main: _Val, other: _Val) -> list[_Block]:
    """The ways `main + other` is a residual block with `main` its main branch."""
    last = flow.fresh_conv(main.space)
    if last is None:
        return []
    out = []
    sp = flow.spaces[flow.find(other.space)]
    if sp.parent is not None and not sp.convs:  # option-A shortcut of the block input
        chain = _chain(flow, last, sp.parent)
        return [_Block(chain, "option_a", None, sp.parent, other.space)] if chain else []
    chain = _chain(flow, last, other.space)
    if chain:  # identity shortcut: `other` is the block input
        out.append(_Block(chain, "identity", None, other.space, other.space))
    ds = flow.fresh_conv(other.space)
    if ds is not None and flow.reads[ds] is not None:
        chain = _chain(flow, last, flow.reads[ds])
        if chain and ds not in chain:  # a projection is not also on the main branch
            out.append(_Block(chain, "downsample", ds, flow.reads[ds], other.space))
    return out


def _residual(flow: _Flow, node: fx.Node, a, b) -> _Val:
    va = flow.tensor_in(node, a, "a residual add")
    vb = flow.tensor_in(node, b, "a residual add")
    if va.flat or vb.flat:
        raise _err(node, "adds flattened features")
    found = _readings(flow, va, vb) + _readings(flow, vb, va)
    if len(found) != 1:
        why = "neither" if not found else "more than one"
        raise _err(node, f"{why} of its operands reads as a residual block's main branch "
                         "(a chain of convs from the block input) with the other as its shortcut")
    block = found[0]
    if block.shortcut == "option_a":
        derived = flow.spaces[flow.find(vb.space)].parent is not None
        block.shortcut_module = _shortcut_source(flow, b if derived else a)
    flow.spaces[flow.find(block.stream_in)].stream = True
    block.stream_out = flow.merge(node, va.space, vb.space)
    flow.blocks.append(block)
    return _Val("space", block.stream_out)


def _shortcut_source(flow: _Flow, node: fx.Node) -> str | None:
    """The ShortcutA module that made an option-A operand (compaction rewrites it), or None
    (an F.pad shortcut)."""
    while node.op != "call_module":
        if node.op != "call_function" or node.target is F.pad or not node.args \
                or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return node.target if isinstance(flow.modules[node.target], ShortcutA) else None


def _function(flow: _Flow, node: fx.Node) -> _Val:
    fn = node.target
    x = node.args[0] if node.args else None
    if fn in _ADD:
        return _binary(flow, node, "add")
    if fn in _MUL:
        return _binary(flow, node, "mul")
    if fn in _CAT:
        return _cat(flow, node)
    if fn in _KEEP_FUNCTIONS:
        return flow.val(node, x)
    if fn is torch.flatten:
        return _flatten(flow, node, x)
    if fn is operator.getitem:
        return _spatial_index(flow, node)
    if fn is F.pad:
        return _pad(flow, node)
    if fn is torch.mean:
        return _mean(flow, node)
    if fn is getattr:
        return _Val("aux")
    if fn is F.conv2d or fn is F.linear or fn is F.batch_norm:
        raise _err(node, "functional layers are not supported: use nn.Conv2d / nn.Linear / nn.BatchNorm modules")
    if all(flow.val(node, a).kind == "aux" for a in node.all_input_nodes):
        return _Val("aux")
    raise _err(node, "this function is not supported")


def _method(flow: _Flow, node: fx.Node) -> _Val:
    m, x = node.target, node.args[0]
    if flow.val(node, x).kind == "aux" or m in _SHAPE_METHODS:
        return _Val("aux")
    if m in ("add", "add_"):
        return _binary(flow, node, "add")
    if m in ("mul", "mul_", "div", "div_"):
        return _binary(flow, node, "mul")
    if m in _KEEP_METHODS:
        return flow.val(node, x)
    if m in ("expand_as", "expand"):  # a gate broadcast over x's positions: same channels
        return flow.val(node, x)
    if m == "flatten":
        return _flatten(flow, node, x)
    if m in ("view", "reshape"):
        return _reshape(flow, node, x)
    if m == "mean":
        return _mean(flow, node)
    raise _err(node, "this tensor method is not supported")


def _visit(flow: _Flow, node: fx.Node) -> _Val:
    if node.op == "placeholder":
        if flow.image_seen:
            raise _err(node, "a second model input is not supported")
        flow.image_seen = True
        return _Val("image")
    if node.op == "get_attr":
        raise _err(node, "direct use of a parameter or buffer is not supported")
    if node.op == "call_module":
        return _module(flow, node)
    if node.op == "call_function":
        return _function(flow, node)
    if node.op == "call_method":
        return _method(flow, node)
    raise _err(node, "unexpected node")


# -- the meta -----------------------------------------------------------------------------

def _flow(model: nn.Module, example_inputs) -> tuple[_Flow, fx.GraphModule]:
    gm = graph_module(model)
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    modes = [(m, m.training) for m in model.modules()]
    try:  # eval: a shape pass must not move BN running statistics
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    finally:
        for m, mode in modes:
            m.training = mode
    flow = _Flow(gm)
    for node in gm.graph.nodes:
        if node.op == "output":
            _output(flow, node)
        else:
            flow.vals[node] = _visit(flow, node)
    if flow.deferred is not None:
        raise flow.deferred
    _settle(flow)
    return flow, gm


def _settle(flow: _Flow) -> None:
    """Convs without BatchNorm: an excitation follows what it gates; one whose output only feeds
    fixed convs or excitations (an SE squeeze) keeps its channels; any other is an error."""
    followed = {flow.find(s) for s in flow.follow.values()}
    parts = {flow.find(p) for sp in flow.spaces for p in sp.parts}
    changed = True
    while changed:
        changed = False
        for conv in flow.convs:
            if conv in flow.bn or conv in flow.gates or conv in flow.fixed:
                continue
            root = flow.find(flow.out_space[conv])
            sp = flow.spaces[root]
            if sp.readers and not sp.stream and root not in followed | parts \
                    and all(r in flow.fixed or r in flow.gates for r in sp.readers):
                flow.fixed.add(conv)
                changed = True
    bad = {c for c in flow.convs if c not in flow.bn and c not in flow.gates and c not in flow.fixed}
    for node, what, conv in flow.pending_reads:
        if conv in bad:
            raise _err(node, f"{what} reads conv '{conv}' before any BatchNorm: every pruned conv "
                             "needs its own BatchNorm")
    for conv in flow.convs:
        if conv in bad:
            raise ValueError(f"trace: conv '{conv}' is not followed by a BatchNorm (every pruned conv needs one)")


def _output(flow: _Flow, node: fx.Node) -> None:
    out = node.args[0]
    v = flow.vals.get(out) if isinstance(out, fx.Node) else None
    if v is None or v.kind != "fixed":
        raise _err(node, "the model must return one tensor made by a linear classifier")
    flow.classifier = v.linear


def trace_meta(model: nn.Module, example_inputs, name: str | None = None) -> ModelMeta:
    """`model`'s pruning dataflow derived from its fx graph. `example_inputs`: a tensor (or a
    tuple of them) the model accepts, used once for channel counts; a small image will do.
    `name` defaults to a declared meta's name (so presets resolve), else the class name."""
    flow, _ = _flow(model, example_inputs)
    declared = getattr(model, "softprune_meta", None)
    name = name or (declared.name if declared is not None else type(model).__name__)
    return _meta(flow, name, example_inputs)


def _meta(flow: _Flow, name: str, example_inputs) -> ModelMeta:
    if flow.first_conv is None:
        raise ValueError("trace: no conv reads the model input")
    x = example_inputs if isinstance(example_inputs, Tensor) else example_inputs[0]
    h, w = x.shape[-2:]
    classifier = flow.modules[flow.classifier]
    meta = ModelMeta(name, "traced", classifier.out_features, int(h) if h == w else (int(h), int(w)),
                     first_conv=flow.first_conv, classifier=flow.classifier)
    order = _conv_order(flow)
    pos = {c: i for i, c in enumerate(order)}
    names = _stream_names(flow, order)
    for conv in order:
        meta.add_conv(conv, flow.bn[conv])
    for conv in flow.convs:
        if conv in flow.fixed:
            meta.fixed.append(conv)
            if conv in flow.bn:
                meta.bn[conv] = flow.bn[conv]
    for root in sorted(names, key=lambda r: min(pos[c] for c in flow.spaces[r].convs)):
        sp = flow.spaces[root]
        parent = names[flow.find(sp.parent)] if sp.parent is not None else None
        meta.add_stream(names[root], sp.width, parent=parent, parent_map=list(sp.parent_map))
        for conv in sorted(sp.convs, key=pos.__getitem__):
            meta.produce(conv, names[root])
    source = _source_names(flow, names)
    for root, sp in _roots(flow):
        if sp.parts:
            meta.concats[sp.cat] = ConcatMeta(sp.cat, [source(p) for p in sp.parts],
                                              [flow.spaces[flow.find(p)].width for p in sp.parts])
    for module, space in flow.follow.items():
        meta.follow[module] = source(space)
        if module in flow.bn:
            meta.bn[module] = flow.bn[module]
    meta.frozen = sorted({source(s) for s in flow.frozen})
    for root, sp in _roots(flow):
        if sp.readers:
            for reader in sorted(sp.readers, key=lambda r: pos.get(r, len(pos))):
                meta.feed(source(root), reader)
    stages: dict[int, int] = {}
    for i, b in enumerate(flow.blocks):
        out = flow.find(b.stream_out)
        stage = stages.setdefault(out, len(stages) + 1)
        meta.blocks.append(BlockMeta(_block_name(b, i), stage, list(b.convs), b.shortcut, b.downsample,
                                     names[flow.find(b.stream_in)], names[out]))
    return meta


def _source_names(flow: _Flow, names: dict[int, str]):
    """space -> its name in the meta: a stream's, a concat's node, or the conv that opened it."""
    def source(space: int) -> str:
        root = flow.find(space)
        sp = flow.spaces[root]
        if root in names or sp.cat:
            return names.get(root) or sp.cat
        if not sp.convs:
            raise ValueError("trace: a shortcut's channels are read without being added to a conv output")
        return sp.convs[0]
    return source


def _roots(flow: _Flow) -> list[tuple[int, _Space]]:
    return [(i, sp) for i, sp in enumerate(flow.spaces) if flow.root[i] == i]


def _conv_order(flow: _Flow) -> list[str]:
    """Forward order, a projection conv moved after its block's main branch (the zoo's order)."""
    ds = {b.downsample: b.convs[-1] for b in flow.blocks if b.downsample}
    order = [c for c in flow.convs if c not in ds and c not in flow.fixed and c not in flow.gates]
    for conv, after in ds.items():
        order.insert(order.index(after) + 1, conv)
    return order


def _stream_names(flow: _Flow, order: list[str]) -> dict[int, str]:
    """Stream root -> name: the module holding the blocks that write it, else "stem"."""
    writers: dict[int, list[str]] = {}
    for i, b in enumerate(flow.blocks):
        writers.setdefault(flow.find(b.stream_out), []).append(_block_name(b, i))
    names: dict[int, str] = {}
    for root, sp in _roots(flow):
        if not sp.stream:
            continue
        if any(c in flow.fixed or c in flow.gates for c in sp.convs):
            bad = next(c for c in sp.convs if c in flow.fixed or c in flow.gates)
            raise ValueError(f"trace: conv '{bad}' (grouped or without BatchNorm) writes into a residual "
                             "stream, which is not supported")
        if not sp.convs:
            raise ValueError(f"trace: a shortcut's channels (width {sp.width}) are read without being "
                             "added to any conv output")
        parents = {b.rpartition(".")[0] for b in writers.get(root, [])}
        candidate = parents.pop() if len(parents) == 1 else ""
        if not candidate and root not in writers:
            candidate = "stem"
        if not candidate or candidate in names.values():
            candidate = min(sp.convs, key=order.index)
        names[root] = candidate
    return names


def _block_name(block: _Block, index: int) -> str:
    convs = block.convs + ([block.downsample] if block.downsample else [])
    parts = [c.split(".") for c in convs]
    common = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    if len(convs) == 1 or common == parts[0]:
        common = common[:-1]
    return ".".join(common) or f"block{index}"


def attach_meta(model: nn.Module, example_inputs, name: str | None = None) -> ModelMeta:
    """Trace `model` and set `model.softprune_meta`, so that grouping, compaction and costing
    treat it like a zoo model. Returns the meta."""
    meta = trace_meta(model, example_inputs, name)
    model.softprune_meta = meta
    return meta


def shortcut_modules(model: nn.Module, example_inputs) -> dict[str, str]:
    """Option-A block name -> the ShortcutA module that implements it (for compaction)."""
    flow, _ = _flow(model, example_inputs)
    return {_block_name(b, i): b.shortcut_module for i, b in enumerate(flow.blocks)
            if b.shortcut == "option_a"}


def compare_meta(declared: ModelMeta, traced: ModelMeta) -> str | None:
    """The first dataflow difference between a declared and a traced meta, or None. Names,
    family and input size are labels, not dataflow, and are not compared; reader lists are
    compared as sets."""
    for key in ("num_classes", "first_conv", "classifier", "convs", "bn", "stream_of", "follow",
                "fixed", "frozen"):
        a, b = getattr(declared, key), getattr(traced, key)
        if a != b:
            return f"{key}: declared {_first_diff(a, b)}, traced {_first_diff(b, a)}"
    for conv in declared.convs:
        a, b = sorted(declared.consumers.get(conv, [])), sorted(traced.consumers.get(conv, []))
        if a != b:
            return f"consumers of '{conv}': declared {a}, traced {b}"
    if declared.concats != traced.concats:
        return f"concats: declared {declared.concats}, traced {traced.concats}"
    if set(declared.streams) != set(traced.streams):
        return f"streams: declared {sorted(declared.streams)}, traced {sorted(traced.streams)}"
    for s, d in declared.streams.items():
        t = traced.streams[s]
        for key in ("width", "parent", "parent_map"):
            if getattr(d, key) != getattr(t, key):
                return f"stream '{s}' {key}: declared {getattr(d, key)}, traced {getattr(t, key)}"
        for key in ("producers", "consumers"):
            if sorted(getattr(d, key)) != sorted(getattr(t, key)):
                return f"stream '{s}' {key}: declared {sorted(getattr(d, key))}, traced {sorted(getattr(t, key))}"
    for d, t in zip(declared.blocks, traced.blocks):
        if d != t:
            return f"block '{d.name}': declared {d}, traced {t}"
    if len(declared.blocks) != len(traced.blocks):
        return f"blocks: declared {len(declared.blocks)}, traced {len(traced.blocks)}"
    return None


def _first_diff(a, b):
    """The first entry of `a` that `b` lacks or holds differently (the whole of `a` if scalar)."""
    if isinstance(a, list):
        return next((f"[{i}]={x!r}" for i, x in enumerate(a) if i >= len(b) or b[i] != x), a)
    if isinstance(a, dict):
        return next((f"[{k!r}]={v!r}" for k, v in a.items() if b.get(k) != v), a)
    return repr(a)
