"""Turn a converter's exception into a keiryo error that names the op and the graph node or layer."""

from __future__ import annotations

import re

from keiryo.errors import ExportError, UnsupportedOpError

_OP_PATTERNS = [
    re.compile(r"OpOverload\(op='([^']+)', overload='([^']+)'\)"),
    re.compile(r"target=torch\.ops\.([A-Za-z0-9_.]+)"),
    re.compile(r"(aten::[A-Za-z0-9_]+)"),
    re.compile(r"(aten\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)"),
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


def layer_of(module: object, node: str | None) -> str | None:
    """The module path of an exported graph node (``layers_3_conv`` -> ``layers.3.conv``), when it exists."""
    if not node:
        return None
    names = {n.replace(".", "_"): n for n, _ in getattr(module, "named_modules", lambda: [])()}
    stem = node
    while stem:
        if stem in names and names[stem]:
            return names[stem]
        stem = stem.rpartition("_")[0]
    return None


def conversion_error(e: BaseException, source: str, converter: str, hint: str, module: object = None) -> ExportError:
    """``UnsupportedOpError`` naming the op (and node/layer) when the text names one, else ``ExportError``."""
    op, node = unsupported_op(error_text(e))
    if op:
        layer = layer_of(module, node)
        at = f" at layer {layer} (graph node {node})" if layer else (f" at graph node {node}" if node else "")
        return UnsupportedOpError(
            f"{source}: {converter} cannot export op {op}{at}; replace it or {hint}", op=op, layer=layer or node
        )
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ExportError(f"{source}: {converter} export failed: {type(e).__name__}: {first[:300]}")
