"""Turn a converter's exception into a keiryo error that names the op and the graph node or layer."""

from __future__ import annotations

import re
from typing import Any

from keiryo.errors import ExportError, KeiryoError, UnsupportedOpError, first_line

_OP_PATTERNS = [
    re.compile(r"OpOverload\(op='([^']+)', overload='([^']+)'\)"),
    re.compile(r"target=torch\.ops\.([A-Za-z0-9_.]+)"),
    re.compile(r"(aten::[A-Za-z0-9_]+)"),
    re.compile(r"(aten\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)"),
    re.compile(r"Unsupported fx node \w+, kind (\w+)"),  # coremltools
    re.compile(r"node \w+ \((\w+)\) got \d+ input"),  # coremltools: a translation that does not fit the op
]
_NODE_PATTERNS = [
    re.compile(r"translating node %([A-Za-z0-9_]+)"),
    re.compile(r"node(?: name)?[:=] ?%?([A-Za-z0-9_]+)"),
]


def error_text(e: BaseException) -> str:
    """The messages of ``e`` and its causes, joined (converters bury the op name in a cause)."""
    parts, seen = [], set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        parts.append(str(cur))
        cur = cur.__cause__ or cur.__context__
    return "\n".join(parts)


def unsupported_op(text: str) -> tuple[str | None, str | None]:
    """(op, graph node) named in a converter's error text, if any."""
    op = None
    for pat in _OP_PATTERNS:
        m = pat.search(text)
        if m:
            op = ".".join(g for g in m.groups() if g)
            break
    node = None
    for pat in _NODE_PATTERNS:
        n = pat.search(text)
        if n:
            node = n.group(1)
            break
    return op, node


def locate(module: Any, example: Any, op: str) -> str | None:
    """The module path (and class) whose forward calls ``op``, from the ``torch.export`` graph's module stack."""
    import torch

    short = op.split(".")[1] if op.startswith("aten.") else op
    if isinstance(example, dict):
        from keiryo.model.io import call_args

        args, kwargs = call_args(module, example, list(example))
    else:
        args, kwargs = (example,), {}
    try:
        graph = torch.export.export(module, args, kwargs or None).graph
    except Exception:
        return None
    for node in graph.nodes:
        target = str(node.target)
        if node.op == "call_function" and (target == op or target.split(".")[1:2] == [short] or node.name == short):
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            if stack:
                path, cls = stack[-1]
                return f"{path or '(the model itself)'} ({str(cls).rsplit('.', 1)[-1]})"
    return None


def conversion_error(
    e: BaseException, source: str, converter: str, hint: str, module: Any = None, example: Any = None
) -> KeiryoError:
    """``UnsupportedOpError`` naming the op and the layer that calls it when the text names one, else ``ExportError``."""
    op, node = unsupported_op(error_text(e))
    if op:
        if "." not in op and not op.startswith("aten"):
            op = f"aten.{op}"
        layer = locate(module, example, op) if module is not None and example is not None else None
        at = f" in layer {layer}" if layer else (f" at graph node {node}" if node else "")
        return UnsupportedOpError(
            f"{source}: {converter} cannot export op {op}{at}; replace it or {hint}", op=op, layer=layer or node
        )
    first = first_line(e)
    return ExportError(f"{source}: {converter} export failed: {type(e).__name__}: {first[:300]}")
