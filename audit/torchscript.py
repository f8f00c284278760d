"""TorchScript models with forward hooks: a Python mirror that steps through the compiled graphs.

A loaded TorchScript archive (``torch.jit.load``, scripted or traced) refuses
``register_forward_hook`` on itself and on every submodule, and the engine explains a layer through a
forward hook (the CAM layer's output becomes a graph leaf, feature maps are copied). :func:`hookable`
wraps the archive in :class:`ScriptedModel`, an ordinary ``nn.Module`` tree with the archive's
module names. Calling a node runs the compiled code as it is, unless a hook sits on it or below it;
then its graph is stepped through in Python, one graph node at a time (constants, attribute reads,
list/tuple packing and ``aten`` operators, each run by its own compiled operator), and every child
module is called through its mirror node, so hooks fire exactly where the compiled code calls that
module. Nothing is re-implemented: each layer still runs its compiled forward.

A graph with control flow (``prim::If``, ``prim::Loop``) or calls to free functions cannot be stepped
through this way; its module is mirrored as one opaque node (hooks on it work, its insides are not
offered as layers), so the engine's layer list only names layers whose hooks really fire.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from audit.errors import ModelError

__all__ = ["ScriptedModel", "hookable", "is_torchscript"]

_SIMPLE = {"prim::Constant", "prim::GetAttr", "prim::CallMethod", "prim::ListConstruct",
           "prim::TupleConstruct", "prim::ListUnpack", "prim::TupleUnpack", "prim::TupleIndex",
           "prim::NumToTensor"}


def is_torchscript(module: Any) -> bool:
    return isinstance(module, torch.jit.ScriptModule)


def hookable(script: torch.jit.ScriptModule, name: str = "TorchScript model") -> "ScriptedModel":
    """The archive's mirror: the same module names, forward hooks allowed where the graphs allow.

    ``name`` (e.g. "checkpoint m.pt (TorchScript)") starts the message when the archive cannot run on
    the batch it is given or does not return one tensor of class scores.
    """
    root = _mirror(script)
    object.__setattr__(root, "root_name", name)
    return root


class ScriptedModel(nn.Module):
    """One node of the mirror; the root owns nothing itself and hands parameters and state to the archive.

    ``script`` is kept outside ``nn.Module``'s registries, so ``named_modules()`` lists the mirror
    only; ``state_dict``, ``named_parameters``, ``named_buffers``, ``train`` and device moves are those
    of the archive (the fingerprint of the mirror is the fingerprint of the archive).
    """

    def __init__(self, script: torch.jit.ScriptModule):
        nn.Module.__init__(self)  # not super(): a mirror of nn.ReLU also derives from nn.ReLU
        object.__setattr__(self, "script", script)
        self.steppable = _steppable(script, "forward")
        if self.steppable:
            for name, child in script.named_children():
                self.add_module(name, _mirror(child))

    def __getattr__(self, name: str) -> Any:
        """Registered children first (nn.Module's rule), then the archive's own attributes: a mirror of
        nn.Conv2d answers ``weight`` or ``out_channels`` as far as the archive kept them."""
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            script = self.__dict__.get("script")
            if script is None or name in script._modules:  # the archive's submodules: only through mirrors
                raise
            return getattr(script, name)

    # -- running
    def forward(self, *args: Any) -> Any:
        root = getattr(self, "root_name", None)
        if root is None:
            return self._run(args)
        try:
            out = self._run(args)
        except RuntimeError as exc:  # torch.jit.Error included: the archive's code refused the input
            shapes = ", ".join(f"({', '.join(map(str, a.shape))})" for a in args if isinstance(a, torch.Tensor))
            raise ModelError(f"{root} cannot run on an input batch of shape {shapes}: {_last_line(exc)}") from None
        if not isinstance(out, torch.Tensor):
            raise ModelError(f"{root} returns {_describe(out)}, not one tensor of class scores (N, classes); "
                             "save a wrapper whose forward returns the logits only")
        return out

    def _run(self, args: tuple[Any, ...]) -> Any:
        if self.steppable and self._hooks_below():
            return _step(self, "forward", args)
        return self.script(*args)

    def _hooks_below(self) -> bool:
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.modules() if m is not self)

    # -- the archive's state
    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        return self.script.named_parameters(prefix=prefix, recurse=recurse)

    def named_buffers(self, prefix: str = "", recurse: bool = True,
                      remove_duplicate: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        return self.script.named_buffers(prefix=prefix, recurse=recurse)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.script.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.script.load_state_dict(*args, **kwargs)

    def train(self, mode: bool = True) -> "ScriptedModel":
        self.script.train(mode)
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> "ScriptedModel":
        self.script._apply(fn)
        return self

    def extra_repr(self) -> str:
        return f"TorchScript {self.script.original_name}" + ("" if self.steppable else " (opaque)")


_MIRROR_TYPES: dict[type, type] = {}


def _mirror(script: torch.jit.ScriptModule) -> ScriptedModel:
    """A mirror node; for a torch.nn layer (``ReLU``, ``MaxPool2d``, ``Sequential``, ...) it is also an
    instance of that class, so code that asks ``isinstance(m, nn.ReLU)`` (the engine's choice of the
    default CAM layer) sees the archive's layers as it sees the eager model's. Only the class is
    shared: every call runs the archive's compiled code."""
    base = _torch_nn_class(script)
    if base is None:
        return ScriptedModel(script)
    cls = _MIRROR_TYPES.get(base)
    if cls is None:
        cls = type(f"Scripted{base.__name__}", (ScriptedModel, base), {"__module__": __name__})
        _MIRROR_TYPES[base] = cls
    return cls(script)


def _torch_nn_class(script: torch.jit.ScriptModule) -> type | None:
    try:
        qualified = script._c._type().qualified_name()
    except (AttributeError, RuntimeError):
        return None
    if not qualified.startswith("__torch__.torch.nn.modules."):
        return None
    cls = getattr(nn, qualified.rsplit(".", 1)[-1], None)
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) else None


def _method_graph(script: torch.jit.ScriptModule, method: str) -> Any:
    return getattr(script, method).graph


def _steppable(script: torch.jit.ScriptModule, method: str) -> bool:
    return blocker(script, method) is None


def blocker(script: torch.jit.ScriptModule, method: str = "forward",
            seen: frozenset[str] = frozenset()) -> str | None:
    """Why the graph of ``method`` cannot be stepped through (the first node kind :func:`_step` does
    not run, e.g. ``prim::If``), or None: straight-line code of attribute reads, module calls and
    operators, including the methods it calls on the same module."""
    try:
        graph = _method_graph(script, method)
    except (AttributeError, RuntimeError):
        return f"no graph for {method}"
    self_value = next(iter(graph.inputs()))
    for node in graph.nodes():
        kind = node.kind()
        if kind.startswith("aten::"):
            if node.schema() == "(no schema)":
                return kind
            continue
        if kind not in _SIMPLE:
            return kind
        if kind == "prim::CallMethod":
            owner = next(iter(node.inputs()))
            name = node.s("name")
            if owner.unique() == self_value.unique() and name not in seen | {method}:
                inner = blocker(script, name, seen | {method})
                if inner is not None:
                    return inner
    return None


def _step(node_module: ScriptedModel, method: str, args: tuple[Any, ...]) -> Any:
    """Run ``method``'s graph of ``node_module``'s archive node by node, module calls through the mirror."""
    graph = _method_graph(node_module.script, method)
    inputs = list(graph.inputs())
    env: dict[int, Any] = {inputs[0].unique(): node_module}
    for value, arg in zip(inputs[1:], args):
        env[value.unique()] = arg
    for node in graph.nodes():
        kind = node.kind()
        ins = [env[v.unique()] for v in node.inputs()]
        outs = list(node.outputs())
        if kind == "prim::Constant":
            result: Any = None if outs[0].type().kind() == "NoneType" else node.output().toIValue()
        elif kind == "prim::GetAttr":
            owner, name = ins[0], node.s("name")
            if isinstance(owner, ScriptedModel):
                result = owner._modules[name] if name in owner._modules else getattr(owner.script, name)
            else:
                result = getattr(owner, name)
        elif kind == "prim::CallMethod":
            owner, name = ins[0], node.s("name")
            if isinstance(owner, ScriptedModel):
                result = owner(*ins[1:]) if name == "forward" else _step(owner, name, tuple(ins[1:]))
            else:
                result = getattr(owner, name)(*ins[1:])
        elif kind == "prim::ListConstruct":
            result = list(ins)
        elif kind == "prim::TupleConstruct":
            result = tuple(ins)
        elif kind in ("prim::ListUnpack", "prim::TupleUnpack"):
            for value, item in zip(outs, ins[0]):
                env[value.unique()] = item
            continue
        elif kind == "prim::TupleIndex":
            result = ins[0][ins[1]]
        elif kind == "prim::NumToTensor":
            result = torch.scalar_tensor(ins[0])
        else:  # aten::
            result = _aten(node, ins)
        if len(outs) == 1:
            env[outs[0].unique()] = result
        else:
            for value, item in zip(outs, result):
                env[value.unique()] = item
    returned = [env[v.unique()] for v in graph.outputs()]
    return returned[0] if len(returned) == 1 else tuple(returned)


def _aten(node: Any, ins: list[Any]) -> Any:
    """An ``aten`` node run by its own operator overload, keyword-only arguments passed by name."""
    schema = torch._C.parse_schema(node.schema())
    name = schema.name.split("::", 1)[1]
    packet = getattr(torch.ops.aten, name)
    op = getattr(packet, schema.overload_name or "default")
    positional, keywords = [], {}
    for argument, value in zip(schema.arguments, ins):
        if argument.kwarg_only:
            keywords[argument.name] = value
        else:
            positional.append(value)
    return op(*positional, **keywords)


def _last_line(exc: BaseException) -> str:
    """The archive's own error without the TorchScript interpreter's traceback around it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1]
    return last.split("Error: ", 1)[1] if last.startswith(("RuntimeError: ", "ValueError: ")) else last


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor ({', '.join(map(str, value.shape))})"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_describe(v) for v in value[:4])
        return f"a {type(value).__name__} of {len(value)} ({inner}{', ...' if len(value) > 4 else ''})"
    if isinstance(value, dict):
        return f"a dict with keys {', '.join(map(str, list(value)[:4]))}"
    return type(value).__name__
