"""PyTorch -> parsicore exporter: ``export_torch(module, example_input, path)``.

torch is imported inside the functions only (the optional extra ``torch``). The module is traced with
torch.fx (``nn.Sequential`` models that fx cannot trace are walked child by child instead) and run once on
the example input with an fx Interpreter, which gives every node's value: shapes, the constants (nodes that
do not depend on the input) and PyTorch's intermediate tensors for locating a diverging layer.

Names: a parsicore node is named after the module's qualified name (``layer1.0.conv1``; a module called
twice gets ``#2``, ``#3``...) or the fx node name for functions (``add_3``); every tensor is named after
the fx node that produced it, so ``parsicore check`` and the exporter's own verification can line
parsicore's intermediate tensors up with PyTorch's.

Gates (:mod:`parsicore.export.torch_modules`): ``LKAMGate`` and ``TopKGate`` modules are fx leaves and
become the ops of the same names. The mask multiplication is recognised as ``ChannelMask`` when a ``mul``
(``*``, ``torch.mul``, ``Tensor.mul``) has as one operand a view of a gate module's output to (N, K, 1, 1)
(``mask[:, :, None, None]`` as written by ``apply_mask``, ``mask.unsqueeze(-1).unsqueeze(-1)``,
``mask.view(n, k, 1, 1)``/``reshape``) and as the other a tensor with K channels; the ``ChannelMask``
module is converted directly. The same view of any other (N, C) tensor (an SE block's weights) becomes a
Reshape and a plain Mul, so only gates switch convs' kernels off. A TopKGate's keep ratio is written as
``k / K`` with the k PyTorch keeps (``ceil(keep_ratio * K)``), so the engine keeps the same count.

Everything unsupported is collected and reported at once as a ConversionError naming each module or
function by its qualified name.
"""

from __future__ import annotations

import inspect
import math
import operator
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from parsicore.builder import ModelBuilder
from parsicore.errors import ConversionError, ParsicoreError
from parsicore.format import NAME_RE, ModelFile

#: Tolerance of the exporter's own verification (relative to the output scale), as ``parsicore check``.
VERIFY_RTOL = 1e-4
VERIFY_ATOL = 1e-6

_ALIAS_METHODS = ("contiguous", "clone", "detach", "float")
_RESHAPE_METHODS = ("view", "reshape", "flatten", "squeeze", "unsqueeze")
_ACTIVATION_METHODS = ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "softmax")
_BINARY_METHODS = {"add": "add", "add_": "add", "__add__": "add", "__radd__": "add", "mul": "mul", "mul_": "mul",
                   "__mul__": "mul", "__rmul__": "mul", "sub": "sub", "sub_": "sub", "div": "div", "div_": "div"}


_KNOWN_METHODS = (*_ALIAS_METHODS, *_RESHAPE_METHODS, *_ACTIVATION_METHODS, *_BINARY_METHODS, "mean", "amax", "size",
                  "dim")


class _Unsupported(Exception):
    """One node cannot be converted; the message names what (collected, then raised together)."""


def export_torch(module: Any, example_input: Any, path: str | os.PathLike[str] | None = None, name: str | None = None,
                 labels: Sequence[str] | None = None, preprocessing: Mapping[str, Any] | None = None,
                 selftest: bool = True, description: str = "", license: str = "", float16: bool = False) -> ModelFile:
    """Convert ``module`` (eval mode) to a parsicore model; save it to ``path`` when given.

    example_input: float32 (N, C, H, W) or (N, F) torch tensor or numpy array; fixes the model's input
    shape (the batch stays dynamic). labels: class names; preprocessing: keyword arguments of
    :meth:`ModelBuilder.set_preprocessing`. selftest: embed the example input and PyTorch's output as
    the self-test vector and verify that parsicore reproduces it (ConversionError naming the first
    diverging layer otherwise). The weights checksum is added by the builder.
    Raises ConversionError listing every unsupported module/function.
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise ConversionError(f"export_torch needs a torch.nn.Module, got {type(module).__name__}")
    x = torch.as_tensor(np.asarray(example_input, dtype=np.float32)) if not isinstance(example_input, torch.Tensor) \
        else example_input.detach().to(torch.float32)
    if x.ndim not in (2, 4) or x.shape[0] < 1:
        raise ConversionError(f"example input must be (N, C, H, W) or (N, F), got shape {tuple(x.shape)}")
    model_name = name or type(module).__name__
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            gm = _trace(module, x)
            values = _run_recording(gm, x)
            expected = module(x)
        builder = ModelBuilder(model_name, description=description, license=license,
                               producer=f"parsicore.export.torch_export (torch {torch.__version__})")
        converter = _Converter(torch, gm, values, builder, model_name)
        outputs = converter.convert(expected)
    finally:
        module.train(was_training)
    if labels is not None:
        builder.set_labels(labels)
    if preprocessing is not None:
        try:
            builder.set_preprocessing(**preprocessing)
        except (TypeError, ValueError) as e:
            raise ConversionError(f"{model_name}: bad preprocessing: {e}") from e
    expected_arrays = {t: v for t, v in zip(outputs, _output_arrays(expected))}
    x_np = x.numpy().astype(np.float32)
    if selftest:
        builder.set_selftest({converter.input_name: x_np}, expected_arrays)
    model_file = builder.build()
    reference = {n.name: v.detach().numpy() for n, v in values.items() if isinstance(v, torch.Tensor)}
    _validate(model_file, model_name, x_np if selftest else None, expected_arrays, reference, converter.input_name)
    if path is not None:
        try:
            model_file = builder.save(path, float16=float16)
        except ParsicoreError as e:
            raise ConversionError(f"{model_name}: {e}") from e
    return model_file


def _output_arrays(expected: Any) -> list[np.ndarray]:
    import torch

    items = expected if isinstance(expected, (tuple, list)) else [expected]
    out = []
    for item in items:
        if not isinstance(item, torch.Tensor):
            raise ConversionError(f"the module returns {type(item).__name__}; outputs must be tensors")
        out.append(item.detach().numpy().astype(np.float32))
    return out


def _validate(model_file: ModelFile, model_name: str, x: np.ndarray | None, expected: Mapping[str, np.ndarray],
              reference: Mapping[str, np.ndarray], input_name: str) -> None:
    """Load the built model (the graph layer validates it); with x, verify its outputs against PyTorch's."""
    from parsicore.api import load
    from parsicore.check import compare

    try:
        model = load(model_file, backend="numpy")
    except ParsicoreError as e:
        raise ConversionError(f"{model_name}: the exported graph is invalid: {e}") from e
    if x is None:
        return
    results, divergence = compare(model, {input_name: x}, expected, VERIFY_RTOL, VERIFY_ATOL, reference)
    bad = [r for r in results if not r.passed]
    if bad:
        where = ""
        if divergence is not None:
            where = (f"; first diverging layer {divergence.node} ({divergence.op}), max rel error "
                     f"{divergence.max_rel:.3g}{' - ' + divergence.note if divergence.note else ''}")
        raise ConversionError(f"{model_name}: parsicore's output {bad[0].name!r} differs from PyTorch's "
                              f"(max rel error {bad[0].max_rel:.3g}){where}")


# ----------------------------------------------------------------------------------------------- tracing


def _gate_classes() -> tuple[type, type, type]:
    from parsicore.export.torch_modules import ChannelMask, LKAMGate, TopKGate

    return LKAMGate, TopKGate, ChannelMask


def _trace(module: Any, example: Any) -> Any:
    """torch.fx GraphModule of ``module`` with the gate modules as leaves; Sequential walked when fx fails.

    The tracer runs every op on the example input while tracing, so ``x.shape``, ``x.ndim``, ``x.size()``
    and ``x.dim()`` are concrete values (``float(x.shape[1])``, ``torch.full((x.shape[0],), ...)`` trace);
    value-dependent control flow (``if x.sum() > 0``) still fails, as it should.
    """
    import torch
    from torch import fx

    leaves = _gate_classes()
    concrete: dict[str, Any] = {}
    try:
        params = list(inspect.signature(module.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        params = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise ConversionError(f"{type(module).__name__}.forward takes a second required argument {p.name!r}; "
                                  "only single-input models can be exported")
        concrete[p.name] = p.default  # e.g. an optional stats dict: specialise to its default
    try:
        graph = _shape_tracer(fx, leaves, example).trace(module, concrete_args=concrete or None)
        return fx.GraphModule(module, graph)
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError... on untraceable code
        if isinstance(module, torch.nn.Sequential):
            return _sequential_graph(module)
        raise ConversionError(f"torch.fx cannot trace {type(module).__name__} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); make forward traceable or use "
                              "nn.Sequential") from e


def _shape_tracer(fx: Any, leaves: tuple[type, ...], example: Any) -> Any:
    """An fx Tracer computing each node's value on ``example`` as it traces (shapes become concrete)."""
    import torch

    class ShapeProxy(fx.Proxy):
        def __getattr__(self, k: str) -> Any:
            if k in ("shape", "ndim", "device", "dtype"):
                value = self.tracer.values.get(self.node)
                if isinstance(value, torch.Tensor):
                    return getattr(value, k)
            return super().__getattr__(k)

    class ShapeTracer(fx.Tracer):
        def __init__(self) -> None:
            super().__init__()
            self.values: dict[Any, Any] = {}
            self.placeholders = 0
            self.computing = False

        def call_module(self, m: Any, forward: Any, args: Any, kwargs: Any) -> Any:
            if self.computing:  # a real computation (below): run the module, record nothing
                return forward(*args, **kwargs)
            return super().call_module(m, forward, args, kwargs)

        def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: Any) -> Any:
            if self.computing:  # real parameters, not get_attr proxies, inside a real computation
                return attr_val
            return super().getattr(attr, attr_val, parameter_proxy_cache)

        def is_leaf_module(self, m: Any, qualname: str) -> bool:
            return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

        def proxy(self, node: Any) -> Any:
            return ShapeProxy(node, self)

        def value_of(self, node: Any) -> Any:
            if node not in self.values and node.op == "get_attr":
                value = self.root
                for part in node.target.split("."):
                    value = getattr(value, part)
                self.values[node] = value
            return self.values[node]

        def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **kw: Any) -> Any:
            proxy = super().create_proxy(kind, target, args, kwargs, *rest, **kw)
            node = proxy.node
            self.computing = True
            try:
                if kind == "placeholder":
                    self.placeholders += 1
                    value = example if self.placeholders == 1 else (node.args[0] if node.args else None)
                else:
                    a = fx.node.map_arg(node.args, self.value_of)
                    k = fx.node.map_arg(node.kwargs, self.value_of)
                    if kind == "get_attr":
                        value = self.value_of(node)
                    elif kind == "call_function":
                        value = target(*a, **k)
                    elif kind == "call_method":
                        value = getattr(a[0], target)(*a[1:], **k)
                    else:
                        value = self.root.get_submodule(target)(*a, **k)
            except Exception:  # left symbolic: the Interpreter run reports real failures
                return proxy
            finally:
                self.computing = False
            self.values[node] = value
            if kind == "call_method" and target in ("size", "dim"):
                return value  # static here: user code may compute with it (float(x.size(1)))
            return proxy

    return ShapeTracer()


def _sequential_graph(module: Any) -> Any:
    """An fx GraphModule calling the (flattened) children of a Sequential one after the other."""
    import torch
    from torch import fx

    graph = fx.Graph()
    value = graph.placeholder("x")

    def walk(seq: Any, prefix: str) -> None:
        nonlocal value
        for child_name, child in seq.named_children():
            qual = f"{prefix}{child_name}"
            if isinstance(child, torch.nn.Sequential):
                walk(child, qual + ".")
            else:
                value = graph.call_module(qual, (value,))

    walk(module, "")
    graph.output(value)
    return fx.GraphModule(module, graph)


def _run_recording(gm: Any, x: Any) -> dict[Any, Any]:
    """Every fx node's value on input x (placeholders specialised by concrete_args keep their defaults)."""
    from torch import fx

    values: dict[Any, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: Any) -> Any:
            out = super().run_node(n)
            values[n] = out
            return out

    try:
        Recorder(gm).run(x)
    except ParsicoreError:
        raise
    except Exception as e:
        raise ConversionError(f"running the traced module on the example input failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return values


# ----------------------------------------------------------------------------------------------- converting


def _arg(node: Any, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1])) if len(v) == 2 else (int(v[0]), int(v[0]))
    return int(v), int(v)


def _func_name(fn: Any) -> str:
    mod = getattr(fn, "__module__", None) or ""
    return f"{mod}.{getattr(fn, '__name__', repr(fn))}".lstrip(".")


def _in_place(node: Any) -> bool:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op not in ("call_method", "call_function") or not isinstance(name, str):
        return False
    return (name.endswith("_") and not name.endswith("__")) or name in ("iadd", "isub", "imul", "itruediv")


def _sanitise(name: str) -> str:
    cleaned = "".join(c if NAME_RE.match(c) else "_" for c in name)[:190] or "node"
    return cleaned if cleaned not in (".", "..") else "node"


class _Converter:
    """Walks the fx graph once, emitting parsicore nodes into the builder."""

    def __init__(self, torch: Any, gm: Any, values: Mapping[Any, Any], builder: ModelBuilder, label: str) -> None:
        self.torch = torch
        self.label = label
        self.gm = gm
        self.values = values
        self.b = builder
        self.tensor: dict[Any, str] = {}  # fx node -> parsicore tensor name (runtime tensors)
        self.shape: dict[str, tuple[int, ...]] = {}  # parsicore tensor -> full shape (batch first)
        self.pending: dict[Any, tuple[Any, tuple[int, ...]]] = {}  # (N, C) -> (N, C, 1, 1) views, emitted lazily
        self.gate_tensors: set[str] = set()
        self.runtime: set[Any] = set()
        self.poisoned: set[Any] = set()
        self.problems: list[str] = []
        self.names: dict[str, int] = {}
        self.input_name = "input"
        self.lkam, self.topk, self.mask_module = _gate_classes()
        self._table: dict[Callable[..., Any], Callable[[Any], None]] | None = None

    # ------------------------------------------------------------------ driver
    def convert(self, expected: Any) -> list[str]:
        """Convert every node; returns the output tensor names. ConversionError lists every problem."""
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        first = placeholders[0]
        self.input_name = _sanitise(first.name)
        x = self.values[first]
        self.b.add_input(self.input_name, (None, *x.shape[1:]))
        self.tensor[first] = self.input_name
        self.shape[self.input_name] = tuple(x.shape)
        self.runtime.add(first)
        outputs: list[str] = []
        live = self._live_nodes()
        for node in self.gm.graph.nodes:
            if node.op == "placeholder" or (node.op != "output" and node not in live):
                continue
            if node.op == "output":
                outputs = self._outputs(node)
                continue
            if not any(a in self.runtime for a in node.all_input_nodes):
                continue  # a constant: its recorded value is used where needed
            self.runtime.add(node)
            if any(a in self.poisoned for a in node.all_input_nodes):
                # Cannot convert after an unsupported input, but list it too when it is unsupported itself.
                if not self._known(node):
                    self.problems.append(self._what(node))
                self.poisoned.add(node)
                continue
            try:
                self._convert_node(node)
            except _Unsupported as e:
                self.problems.append(str(e))
                self.poisoned.add(node)
        if self.problems:
            raise ConversionError(f"cannot export {self.label}: {len(self.problems)} unsupported "
                                  f"module(s)/function(s): {'; '.join(self.problems)}")
        return outputs

    def _live_nodes(self) -> set[Any]:
        """Nodes the outputs depend on (dead code, e.g. statistics the forward computes on the side, is skipped)."""
        live: set[Any] = set()
        stack = [n for n in self.gm.graph.nodes if n.op == "output"]
        while stack:
            n = stack.pop()
            for a in n.all_input_nodes:
                if a not in live:
                    live.add(a)
                    stack.append(a)
        for n in self.gm.graph.nodes:
            # fx keeps an in-place op's effect only through execution order: unused, it cannot be skipped.
            if n not in live and n.op != "output" and _in_place(n) and any(a in live for a in n.all_input_nodes):
                self.problems.append(f"{self._what(n)}: in-place operation whose result is not used "
                                     "(assign its result, e.g. x = x.relu_())")
        return live

    def _outputs(self, node: Any) -> list[str]:
        result = node.args[0]
        items = list(result) if isinstance(result, (tuple, list)) else [result]
        names = []
        for item in items:
            if item in self.poisoned:
                continue
            if not hasattr(item, "op") or item not in self.runtime:
                self.problems.append("the module's output must be tensors computed from the input")
                continue
            t = self._tensor(item)
            self.b.add_output(t)
            names.append(t)
        return names

    def _what(self, node: Any) -> str:
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            return f"{node.target} ({type(mod).__module__}.{type(mod).__name__})"
        if node.op == "call_method":
            return f"{node.name} (Tensor.{node.target})"
        return f"{node.name} ({_func_name(node.target)})"

    def _known(self, node: Any) -> bool:
        """Whether the node's module type / function / method is one the converter handles at all."""
        nn = self.torch.nn
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            return self._activation_module(mod) is not None or isinstance(mod, (
                self.lkam, self.topk, self.mask_module, nn.Conv2d, nn.BatchNorm2d, nn.BatchNorm1d, nn.Linear,
                nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Dropout,
                nn.Dropout2d, nn.Identity, nn.Softmax, nn.ZeroPad2d, nn.ConstantPad2d))
        if node.op == "call_function":
            if self._table is None:
                self._table = self._function_table()
            if node.target is operator.getitem and len(node.args) == 2:
                items = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
                return all(i is None or i is Ellipsis or i == slice(None) for i in items)
            return node.target in self._table
        return node.op == "call_method" and node.target in _KNOWN_METHODS

    def _fail(self, node: Any, why: str = "") -> _Unsupported:
        return _Unsupported(self._what(node) + (f": {why}" if why else ""))

    # ------------------------------------------------------------------ helpers
    def _node_name(self, node: Any) -> str:
        base = _sanitise(node.target if node.op == "call_module" else node.name)
        count = self.names.get(base, 0) + 1
        self.names[base] = count
        return base if count == 1 else f"{base}#{count}"

    def _value_shape(self, node: Any) -> tuple[int, ...]:
        return tuple(int(d) for d in self.values[node].shape)

    def _emit(self, node: Any, op: str, inputs: Sequence[str], attrs: Mapping[str, Any] | None = None,
              weights: Mapping[str, Any] | None = None, out: str | None = None, name: str | None = None,
              shape: tuple[int, ...] | None = None) -> str:
        """Add one parsicore node for fx ``node``; its output tensor is named after the fx node by default."""
        out = out or node.name
        node_name = name or self._node_name(node)
        np_weights = {k: np.asarray(v, dtype=np.float32) for k, v in (weights or {}).items() if v is not None}
        self.b.add_node(op, list(inputs), [out], name=node_name, attrs=dict(attrs or {}), weights=np_weights)
        self.shape[out] = shape if shape is not None else self._value_shape(node)
        if out == node.name:
            self.tensor[node] = out
        return out

    def _alias(self, node: Any, src: Any) -> None:
        if src in self.pending:
            self.pending[node] = self.pending[src]
        else:
            self.tensor[node] = self._tensor(src)

    def _tensor(self, arg: Any) -> str:
        """The parsicore tensor of a runtime fx node (a pending view is emitted as a Reshape now)."""
        if arg in self.tensor:
            return self.tensor[arg]
        if arg in self.pending:
            src, shape = self.pending[arg]
            return self._emit(arg, "Reshape", [self._tensor(src)], {"shape": list(shape[1:])}, shape=shape)
        raise _Unsupported(f"{arg.name}: not a tensor computed from the input")

    def _const(self, arg: Any) -> np.ndarray:
        value = self.values[arg] if hasattr(arg, "op") else arg
        if isinstance(value, self.torch.Tensor):
            value = value.detach().numpy()
        try:
            return np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise _Unsupported(f"constant {value!r} is not numeric") from e

    def _input(self, node: Any, rank: int | tuple[int, ...] | None = None) -> str:
        src = node.args[0] if node.args else next(iter(node.kwargs.values()))
        if not hasattr(src, "op") or src not in self.runtime:
            raise self._fail(node, "its input is not computed from the model input")
        t = self._tensor(src)
        ranks = (rank,) if isinstance(rank, int) else rank
        if ranks and len(self.shape[t]) not in ranks:
            raise self._fail(node, f"input of shape {self.shape[t]} (expected rank {' or '.join(map(str, ranks))})")
        return t

    # ------------------------------------------------------------------ dispatch
    def _convert_node(self, node: Any) -> None:
        value = self.values[node]
        if not isinstance(value, self.torch.Tensor):
            # x.size(0), x.shape...: static here; only shape ops consume them (they use the recorded shapes).
            if node.op == "call_method" and node.target in ("size", "dim") or \
                    node.op == "call_function" and node.target in (getattr, operator.getitem, len):
                return
            raise self._fail(node, f"produces a {type(value).__name__}, not a tensor")
        if node.op == "call_module":
            self._module(node, self.gm.get_submodule(node.target))
        elif node.op == "call_function":
            self._function(node)
        elif node.op == "call_method":
            self._method(node)
        else:
            raise self._fail(node)

    def _module(self, node: Any, mod: Any) -> None:
        nn = self.torch.nn
        act = self._activation_module(mod)
        if act is not None:
            self._emit(node, act[0], [self._input(node)], act[1])
        elif isinstance(mod, self.lkam):
            self._lkam(node, mod)
        elif isinstance(mod, self.topk):
            self._topk(node, mod)
        elif isinstance(mod, self.mask_module):
            y, m = (self._tensor(a) for a in node.args[:2])
            self._channel_mask(node, y, m)
        elif isinstance(mod, nn.Conv2d):
            self._conv(node, mod)
        elif isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm1d)):
            self._batchnorm(node, mod)
        elif isinstance(mod, nn.Linear):
            self._emit(node, "Gemm", [self._input(node, 2)], weights={
                "weight": mod.weight.detach().numpy(),
                "bias": None if mod.bias is None else mod.bias.detach().numpy()})
        elif isinstance(mod, nn.MaxPool2d):
            self._pool(node, "MaxPool", mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode, dilation=mod.dilation,
                       return_indices=mod.return_indices)
        elif isinstance(mod, nn.AvgPool2d):
            self._pool(node, "AveragePool", mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode,
                       count_include_pad=mod.count_include_pad, divisor_override=mod.divisor_override)
        elif isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            self._adaptive(node, mod.output_size, isinstance(mod, nn.AdaptiveMaxPool2d))
        elif isinstance(mod, nn.Flatten):
            self._reshape(node, node.args[0])
        elif isinstance(mod, (nn.Dropout, nn.Dropout2d, nn.Identity)):
            self._alias(node, node.args[0])
        elif isinstance(mod, nn.Softmax):
            self._softmax(node, mod.dim)
        elif isinstance(mod, (nn.ZeroPad2d, nn.ConstantPad2d)):
            self._pad(node, list(mod.padding), float(getattr(mod, "value", 0.0)), "constant")
        else:
            raise self._fail(node)

    def _activation_module(self, mod: Any) -> tuple[str, dict[str, Any]] | None:
        nn = self.torch.nn
        if isinstance(mod, nn.ReLU):
            return "Relu", {}
        if isinstance(mod, nn.ReLU6):
            return "Clip", {"lo": 0.0, "hi": 6.0}
        if isinstance(mod, nn.Hardtanh):
            return "Clip", {"lo": float(mod.min_val), "hi": float(mod.max_val)}
        if isinstance(mod, nn.LeakyReLU):
            return "LeakyRelu", {"alpha": float(mod.negative_slope)}
        if isinstance(mod, nn.Hardswish):
            return "HardSwish", {}
        if isinstance(mod, nn.Hardsigmoid):
            return "HardSigmoid", {"alpha": 1.0 / 6.0, "beta": 0.5}
        if isinstance(mod, nn.SiLU):
            return "Silu", {}
        if isinstance(mod, nn.Sigmoid):
            return "Sigmoid", {}
        if isinstance(mod, nn.Tanh):
            return "Tanh", {}
        return None

    def _function_table(self) -> dict[Callable[..., Any], Callable[[Any], None]]:
        torch, F = self.torch, self.torch.nn.functional

        def act(op: str, attrs: Callable[[Any], dict[str, Any]] | None = None) -> Callable[[Any], None]:
            return lambda n: self._emit(n, op, [self._input(n)], attrs(n) if attrs else {})

        relu6 = act("Clip", lambda n: {"lo": 0.0, "hi": 6.0})
        table: dict[Callable[..., Any], Callable[[Any], None]] = {
            F.relu: act("Relu"), torch.relu: act("Relu"), torch.relu_: act("Relu"), F.relu6: relu6,
            F.hardtanh: act("Clip", lambda n: {"lo": float(_arg(n, 1, "min_val", -1.0)),
                                               "hi": float(_arg(n, 2, "max_val", 1.0))}),
            F.leaky_relu: act("LeakyRelu", lambda n: {"alpha": float(_arg(n, 1, "negative_slope", 0.01))}),
            F.hardswish: act("HardSwish"),
            F.hardsigmoid: act("HardSigmoid", lambda n: {"alpha": 1.0 / 6.0, "beta": 0.5}),
            F.silu: act("Silu"), torch.sigmoid: act("Sigmoid"), F.sigmoid: act("Sigmoid"),
            torch.tanh: act("Tanh"), F.tanh: act("Tanh"),
            torch.clamp: self._clamp, torch.clip: self._clamp,
            F.softmax: lambda n: self._softmax(n, _arg(n, 1, "dim")),
            torch.softmax: lambda n: self._softmax(n, _arg(n, 1, "dim")),
            F.max_pool2d: lambda n: self._pool(n, "MaxPool", _arg(n, 1, "kernel_size"), _arg(n, 2, "stride"),
                                               _arg(n, 3, "padding", 0), _arg(n, 5, "ceil_mode", False),
                                               dilation=_arg(n, 4, "dilation", 1),
                                               return_indices=_arg(n, 6, "return_indices", False)),
            F.avg_pool2d: lambda n: self._pool(n, "AveragePool", _arg(n, 1, "kernel_size"), _arg(n, 2, "stride"),
                                               _arg(n, 3, "padding", 0), _arg(n, 4, "ceil_mode", False),
                                               count_include_pad=_arg(n, 5, "count_include_pad", True),
                                               divisor_override=_arg(n, 6, "divisor_override")),
            F.adaptive_avg_pool2d: lambda n: self._adaptive(n, _arg(n, 1, "output_size"), False),
            F.adaptive_max_pool2d: lambda n: self._adaptive(n, _arg(n, 1, "output_size"), True),
            torch.flatten: lambda n: self._reshape(n, n.args[0]),
            torch.reshape: lambda n: self._reshape(n, n.args[0]),
            torch.squeeze: lambda n: self._reshape(n, n.args[0]),
            torch.unsqueeze: lambda n: self._reshape(n, n.args[0]),
            F.dropout: lambda n: self._alias(n, n.args[0]), F.dropout2d: lambda n: self._alias(n, n.args[0]),
            torch.cat: self._cat, torch.concat: self._cat,
            F.pad: lambda n: self._pad(n, list(_arg(n, 1, "pad")), _arg(n, 3, "value", None),
                                       _arg(n, 2, "mode", "constant")),
            torch.mean: lambda n: self._reduce(n, "GlobalAveragePool"),
            torch.amax: lambda n: self._reduce(n, "GlobalMaxPool"),
            F.linear: self._linear,
            F.conv2d: self._functional_conv,
            operator.getitem: self._getitem,
        }
        for fn, kind in ((operator.add, "add"), (operator.iadd, "add"), (torch.add, "add"), (operator.mul, "mul"),
                         (operator.imul, "mul"), (torch.mul, "mul"), (operator.sub, "sub"), (operator.isub, "sub"),
                         (torch.sub, "sub"), (operator.truediv, "div"), (operator.itruediv, "div"), (torch.div, "div")):
            table[fn] = lambda n, kind=kind: self._binary(n, kind, n.args[0], n.args[1])
        return table

    def _function(self, node: Any) -> None:
        if self._table is None:
            self._table = self._function_table()
        handler = self._table.get(node.target)
        if handler is None:
            raise self._fail(node)
        handler(node)

    def _method(self, node: Any) -> None:
        m = node.target
        if m in _ALIAS_METHODS:
            self._alias(node, node.args[0])
        elif m in _RESHAPE_METHODS:
            self._reshape(node, node.args[0])
        elif m in ("relu", "relu_"):
            self._emit(node, "Relu", [self._input(node)])
        elif m in ("sigmoid", "sigmoid_"):
            self._emit(node, "Sigmoid", [self._input(node)])
        elif m in ("tanh", "tanh_"):
            self._emit(node, "Tanh", [self._input(node)])
        elif m in ("clamp", "clamp_", "clip"):
            self._clamp(node)
        elif m == "softmax":
            self._softmax(node, _arg(node, 1, "dim"))
        elif m == "mean":
            self._reduce(node, "GlobalAveragePool")
        elif m == "amax":
            self._reduce(node, "GlobalMaxPool")
        elif m in _BINARY_METHODS:
            self._binary(node, _BINARY_METHODS[m], node.args[0], node.args[1])
        else:
            raise self._fail(node)

    # ------------------------------------------------------------------ layers
    def _conv_attrs(self, node: Any, weight: np.ndarray, stride: Any, padding: Any, dilation: Any,
                    groups: int) -> dict[str, Any]:
        kh, kw = weight.shape[2:]
        dh, dw = _pair(dilation)
        if isinstance(padding, str):
            if padding == "valid":
                pads = (0, 0, 0, 0)
            elif padding == "same":
                th, tw = dh * (kh - 1), dw * (kw - 1)
                pads = (th // 2, tw // 2, th - th // 2, tw - tw // 2)  # PyTorch puts the odd pixel at the end
            else:
                raise self._fail(node, f"padding={padding!r}")
        else:
            ph, pw = _pair(padding)
            pads = (ph, pw, ph, pw)
        return {"stride": list(_pair(stride)), "pads": list(pads), "dilation": [dh, dw], "groups": int(groups),
                "kernel": [int(kh), int(kw)]}

    def _conv(self, node: Any, mod: Any) -> None:
        if mod.padding_mode != "zeros":
            raise self._fail(node, f"padding_mode={mod.padding_mode!r} (only 'zeros')")
        w = mod.weight.detach().numpy()
        attrs = self._conv_attrs(node, w, mod.stride, mod.padding, mod.dilation, mod.groups)
        bias = None if mod.bias is None else mod.bias.detach().numpy()
        self._emit(node, "Conv", [self._input(node, 4)], attrs, {"weight": w, "bias": bias})

    def _functional_conv(self, node: Any) -> None:
        w_arg, b_arg = _arg(node, 1, "weight"), _arg(node, 2, "bias")
        if any(a in self.runtime for a in (w_arg, b_arg) if hasattr(a, "op")):
            raise self._fail(node, "weights computed from the input")
        w = self._const(w_arg)
        attrs = self._conv_attrs(node, w, _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0),
                                 _arg(node, 5, "dilation", 1), int(_arg(node, 6, "groups", 1)))
        self._emit(node, "Conv", [self._input(node, 4)], attrs,
                   {"weight": w, "bias": None if b_arg is None else self._const(b_arg)})

    def _linear(self, node: Any) -> None:
        w_arg, b_arg = _arg(node, 1, "weight"), _arg(node, 2, "bias")
        if any(a in self.runtime for a in (w_arg, b_arg) if hasattr(a, "op")):
            raise self._fail(node, "weights computed from the input")
        self._emit(node, "Gemm", [self._input(node, 2)],
                   weights={"weight": self._const(w_arg), "bias": None if b_arg is None else self._const(b_arg)})

    def _batchnorm(self, node: Any, mod: Any) -> None:
        if mod.running_mean is None or mod.running_var is None:
            raise self._fail(node, "no running statistics (track_running_stats=False)")
        c = mod.num_features
        scale = np.ones(c, np.float32) if mod.weight is None else mod.weight.detach().numpy()
        bias = np.zeros(c, np.float32) if mod.bias is None else mod.bias.detach().numpy()
        rank = (4,) if isinstance(mod, self.torch.nn.BatchNorm2d) else (2,)
        self._emit(node, "BatchNorm", [self._input(node, rank)], {"epsilon": float(mod.eps)},
                   {"scale": scale, "bias": bias, "mean": mod.running_mean.numpy(), "var": mod.running_var.numpy()})

    def _clamp(self, node: Any) -> None:
        lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
        if hasattr(lo, "op") or hasattr(hi, "op"):
            raise self._fail(node, "tensor bounds")
        big = float(np.finfo(np.float32).max)
        self._emit(node, "Clip", [self._input(node)], {"lo": -big if lo is None else float(lo),
                                                        "hi": big if hi is None else float(hi)})

    def _softmax(self, node: Any, dim: Any) -> None:
        if dim is None:
            raise self._fail(node, "softmax without dim")
        self._emit(node, "Softmax", [self._input(node)], {"axis": int(dim)})

    def _pool(self, node: Any, op: str, kernel: Any, stride: Any, padding: Any, ceil_mode: bool, dilation: Any = 1,
              return_indices: bool = False, count_include_pad: bool = True, divisor_override: Any = None) -> None:
        if _pair(dilation) != (1, 1):
            raise self._fail(node, f"dilation={dilation}")
        if return_indices:
            raise self._fail(node, "return_indices=True")
        if divisor_override:
            raise self._fail(node, f"divisor_override={divisor_override}")
        k = _pair(kernel)
        s = k if stride is None or (isinstance(stride, (list, tuple)) and not stride) else _pair(stride)
        ph, pw = _pair(padding)
        attrs: dict[str, Any] = {"kernel": list(k), "stride": list(s), "pads": [ph, pw, ph, pw],
                                 "ceil_mode": bool(ceil_mode)}
        if op == "AveragePool":
            attrs["count_include_pad"] = bool(count_include_pad)
        self._emit(node, op, [self._input(node, 4)], attrs)

    def _adaptive(self, node: Any, output_size: Any, is_max: bool) -> None:
        t = self._input(node, 4)
        h, w = self.shape[t][2:]
        oh, ow = _pair(output_size) if output_size is not None else (h, w)
        oh, ow = oh or h, ow or w  # None in a pair keeps that size
        if (oh, ow) == (1, 1):
            self._emit(node, "GlobalMaxPool" if is_max else "GlobalAveragePool", [t])
        elif h % oh == 0 and w % ow == 0:
            k = [h // oh, w // ow]
            attrs: dict[str, Any] = {"kernel": k, "stride": k, "pads": [0, 0, 0, 0], "ceil_mode": False}
            if not is_max:
                attrs["count_include_pad"] = False
            self._emit(node, "MaxPool" if is_max else "AveragePool", [t], attrs)
        else:
            raise self._fail(node, f"output size {(oh, ow)} does not divide the input {(h, w)}")

    def _reduce(self, node: Any, op: str) -> None:
        """mean/amax over the spatial dims (2, 3) -> global pooling, flattened unless keepdim."""
        t = self._input(node, 4)
        dim = _arg(node, 1, "dim")
        dims = sorted(int(d) % 4 for d in (dim if isinstance(dim, (tuple, list)) else [dim])) if dim is not None else []
        if dims != [2, 3]:
            raise self._fail(node, f"reduction over dims {dim} (only the spatial dims 2, 3)")
        keepdim = bool(_arg(node, 2, "keepdim", False))
        if keepdim:
            self._emit(node, op, [t])
            return
        n, c = self.shape[t][:2]
        base = self._node_name(node)
        pooled = self._emit(node, op, [t], out=f"{node.name}:pool", name=base, shape=(n, c, 1, 1))
        self._emit(node, "Flatten", [pooled], {"axis": 1}, name=f"{base}:flatten")

    def _reshape(self, node: Any, src: Any) -> None:
        """view/reshape/flatten/(un)squeeze/None-indexing: decided on the recorded shapes, batch kept."""
        if not hasattr(src, "op") or src not in self.runtime:
            raise self._fail(node, "its input is not computed from the model input")
        in_shape = self.values[src].shape
        out_shape = self._value_shape(node)
        if len(out_shape) < 2 or out_shape[0] != in_shape[0]:
            raise self._fail(node, f"reshapes {tuple(in_shape)} to {out_shape}, changing the batch dimension")
        root = self.pending[src][0] if src in self.pending else src
        root_shape = tuple(self.values[root].shape)
        if tuple(in_shape) == out_shape:
            self._alias(node, src)
        elif len(root_shape) == 2 and out_shape[:2] == root_shape and all(d == 1 for d in out_shape[2:]):
            self.pending[node] = (root, out_shape)  # (N, C) viewed as (N, C, 1, 1): maybe a gate mask, see _binary
        elif len(out_shape) == 2:
            self._emit(node, "Flatten", [self._tensor(src)], {"axis": 1})
        else:
            self._emit(node, "Reshape", [self._tensor(src)], {"shape": list(out_shape[1:])})

    def _getitem(self, node: Any) -> None:
        src, index = node.args
        items = index if isinstance(index, tuple) else (index,)
        if all(i is None or i is Ellipsis or i == slice(None) for i in items):
            self._reshape(node, src)
        else:
            raise self._fail(node, f"tensor indexing {index!r} (only [:, :, None, None]-style views)")

    def _cat(self, node: Any) -> None:
        parts = _arg(node, 0, "tensors")
        dim = int(_arg(node, 1, "dim", 0))
        rank = len(self._value_shape(node))
        if dim % rank != 1:
            raise self._fail(node, f"concatenation on dim {dim} (only the channel dim 1)")
        if not all(hasattr(p, "op") and p in self.runtime for p in parts):
            raise self._fail(node, "concatenates a constant")
        self._emit(node, "Concat", [self._tensor(p) for p in parts], {"axis": 1})

    def _pad(self, node: Any, pad: list[Any], value: Any, mode: str) -> None:
        if mode != "constant":
            raise self._fail(node, f"mode={mode!r} (only 'constant')")
        if len(pad) == 2:
            pad = [*pad, 0, 0]
        if len(pad) != 4 or any(int(p) < 0 for p in pad):
            raise self._fail(node, f"pad={pad} (4 non-negative values over H, W)")
        left, right, top, bottom = (int(p) for p in pad)
        self._emit(node, "Pad", [self._input(node, 4)], {"pads": [top, left, bottom, right],
                                                          "value": float(value or 0.0)})

    # ------------------------------------------------------------------ arithmetic
    def _operand(self, arg: Any) -> tuple[str, Any]:
        if hasattr(arg, "op") and arg in self.runtime and isinstance(self.values[arg], self.torch.Tensor):
            if arg in self.pending:
                return "pending", arg
            return "tensor", self._tensor(arg)
        return "const", self._const(arg)

    def _binary(self, node: Any, kind: str, a_arg: Any, b_arg: Any) -> None:
        if kind == "add" and node.kwargs.get("alpha", 1) != 1:
            raise self._fail(node, "alpha != 1")
        a, b = self._operand(a_arg), self._operand(b_arg)
        if kind == "mul":
            for view, other in ((b, a), (a, b)):
                if view[0] == "pending" and other[0] != "const":
                    src, _ = self.pending[view[1]]
                    mask = self._tensor(src)
                    if mask in self.gate_tensors:
                        y = other[1] if other[0] == "tensor" else self._tensor(other[1])
                        self._channel_mask(node, y, mask)
                        return
        a = ("tensor", self._tensor(a[1])) if a[0] == "pending" else a
        b = ("tensor", self._tensor(b[1])) if b[0] == "pending" else b
        out_shape = self._value_shape(node)
        if a[0] == "tensor" and b[0] == "tensor":
            x, y = a[1], b[1]
            if kind == "div":
                raise self._fail(node, "division by a tensor")
            if kind == "sub":
                y = self._emit(node, "Mul", [y], weights={"constant": np.array([-1.0], np.float32)},
                               out=f"{node.name}:neg", name=f"{self._node_name(node)}:neg", shape=self.shape[y])
            if self.shape[x] != out_shape and self.shape[y] == out_shape:
                x, y = y, x
            if self.shape[x] != out_shape:
                raise self._fail(node, f"broadcasts {self.shape[x]} and {self.shape[y]} to a larger shape")
            self._emit(node, "Add" if kind in ("add", "sub") else "Mul", [x, y])
            return
        tensor_first = a[0] == "tensor"
        t, c = (a[1], b[1]) if tensor_first else (b[1], a[1])
        if self.shape[t] != out_shape:
            raise self._fail(node, f"a constant of shape {c.shape} enlarges {self.shape[t]}")
        if c.ndim == len(out_shape):
            if c.shape[0] != 1:
                raise self._fail(node, f"a constant of shape {c.shape} with a batch dimension")
            c = c[0]
        c = c.reshape(1) if c.ndim == 0 else c
        if kind == "div" and not tensor_first:
            raise self._fail(node, "a constant divided by a tensor")
        if kind == "sub" and not tensor_first:  # c - x = (-1) * x + c
            neg = self._emit(node, "Mul", [t], weights={"constant": np.array([-1.0], np.float32)},
                             out=f"{node.name}:neg", name=f"{self._node_name(node)}:neg", shape=self.shape[t])
            self._emit(node, "Add", [neg], weights={"constant": c})
            return
        if kind == "sub":
            c, kind = -c, "add"
        elif kind == "div":
            with np.errstate(divide="ignore"):
                c, kind = (1.0 / c).astype(np.float32), "mul"
            if not np.isfinite(c).all():
                raise self._fail(node, "division by zero")
        self._emit(node, "Add" if kind == "add" else "Mul", [t], weights={"constant": c})

    # ------------------------------------------------------------------ gates
    def _channel_mask(self, node: Any, y: str, mask: str) -> None:
        ys, ms = self.shape[y], self.shape[mask]
        if len(ms) != 2 or len(ys) not in (2, 4) or ys[1] != ms[1]:
            raise self._fail(node, f"mask of shape {ms} for a tensor of shape {ys}")
        self._emit(node, "ChannelMask", [y, mask])

    def _lkam(self, node: Any, mod: Any) -> None:
        k = int(mod.kernel_size)
        b1, b2 = mod.bank1, getattr(mod, "bank2", None)
        if (tuple(b1.kernel_size) != (k, k) or tuple(b1.stride) != (1, 1) or tuple(b1.padding) != (k // 2, k // 2)
                or tuple(b1.dilation) != (1, 1) or b1.groups != 1 or b1.bias is None or b1.padding_mode != "zeros"):
            raise self._fail(node, "bank1 must be a k x k conv, stride 1, padding k//2, with bias")
        weights = {"w1": b1.weight.detach().numpy(), "b1": b1.bias.detach().numpy()}
        if b2 is not None:
            if tuple(b2.kernel_size) != (1, 1) or tuple(b2.stride) != (1, 1) or b2.groups != 1 or b2.bias is None \
                    or tuple(b2.padding) != (0, 0):
                raise self._fail(node, "bank2 must be a 1x1 conv with bias")
            weights.update(w2=b2.weight.detach().numpy(), b2=b2.bias.detach().numpy())
        attrs = {"kernel_size": k, "activation": mod.activation, "pool": mod.pool,
                 "threshold": float(mod.threshold), "mode": mod.mode}
        self.gate_tensors.add(self._emit(node, "LKAMGate", [self._input(node, 4)], attrs, weights))

    def _topk(self, node: Any, mod: Any) -> None:
        fc = mod.fc
        if fc.bias is None:
            raise self._fail(node, "fc without bias")
        k_total = int(fc.out_features)
        kept = int(getattr(mod, "k", max(1, math.ceil(mod.keep_ratio * k_total))))
        attrs = {"keep_ratio": kept / k_total, "activation": mod.activation, "pool": mod.pool,
                 "scaled": bool(mod.scaled)}
        self.gate_tensors.add(self._emit(node, "TopKGate", [self._input(node, 4)], attrs,
                                         {"weight": fc.weight.detach().numpy(), "bias": fc.bias.detach().numpy()}))
