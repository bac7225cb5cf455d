"""SmoothQuant-style activation smoothing of MatMul/Gemm inputs before int8 (Xiao et al., 2023).

Transformer activations carry a few input channels whose values are 10-100x larger than the rest (the
LayerNorm outputs of BERT-class encoders, the post-GELU FFN activations). One per-tensor int8 scale, static or
computed at run time, has to cover them, so every other channel keeps only a few levels. Smoothing moves that
range into the weights, exactly: for a MatMul ``Y = X @ W`` with a constant ``W`` of shape ``(K, N)``,

    ``s_k = max|X_k| ** alpha / max|W_k,:| ** (1 - alpha)``,  ``Y = (X / s) @ (s[:, None] * W)``

with the per-channel maxima ``max|X_k|`` measured on the calibration inputs. ``alpha`` moves the difficulty:
0 leaves the activations as they are, 1 flattens them completely into the weights (whose int8 grid is per
output channel, so it absorbs the row scaling much better than a per-tensor activation scale could).

``1 / s`` is folded into the producer where that is exact and private to the MatMuls: a
``LayerNormalization`` (its scale and bias) or a ``Mul`` by a constant (the last ``* 0.5`` of an exported GELU)
whose output feeds nothing else. Elsewhere (a LayerNorm output that
also feeds a residual Add, attention's context) a ``Mul`` by ``1 / s``
is inserted before the MatMuls; the int8 passes leave those ``Mul`` nodes in float (they are returned so the
static pass can exclude them). MatMuls that read the same activation share one ``s`` (the weight maximum is
taken over all of them).

Registered as the ``smooth_alpha`` option of ``quantize.int8_dynamic`` and ``quantize.int8_static``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from keiryo.errors import DataError, PassError

MIN_SCALE, MAX_SCALE = 1e-4, 1e4


@dataclass
class SmoothReport:
    """What smoothing did: the MatMuls whose weights were scaled, the nodes whose constants absorbed ``1 / s``
    (LayerNorms, GELU Muls), and the ``Mul`` nodes inserted. Both of the latter stay float in the int8 passes
    (:attr:`float_nodes`): a per-tensor int8 grid on a ``1 / s`` vector would flush its small entries to 0."""

    alpha: float
    matmuls: list[str] = field(default_factory=list)
    folded_into: list[str] = field(default_factory=list)
    mul_nodes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # activations without outlier channels (below min_ratio)
    max_activation_ratio: float = 1.0  # largest (max channel / median channel) of the smoothed activations, before

    @property
    def float_nodes(self) -> list[str]:
        return [*self.folded_into, *self.mul_nodes]

    def as_info(self) -> dict[str, Any]:
        return {
            "smooth_alpha": self.alpha,
            "smoothed_matmuls": len(self.matmuls),
            "smooth_folded": len(self.folded_into),
            "smooth_muls": len(self.mul_nodes),
            "smooth_skipped": len(self.skipped),
            "smooth_max_outlier_ratio": round(self.max_activation_ratio, 1),
        }


def _weight(node: Any, inits: dict[str, Any]) -> tuple[str, bool] | None:
    """The constant weight input of a MatMul/Gemm and whether it is stored transposed ((N, K): Gemm transB=1)."""
    if node.op_type == "MatMul":
        name = node.input[1]
        if name in inits and len(inits[name].dims) == 2:
            return name, False
        return None
    if node.op_type == "Gemm":
        attrs = {a.name: a for a in node.attribute}
        if "transA" in attrs and attrs["transA"].i:
            return None
        name = node.input[1]
        if name in inits and len(inits[name].dims) == 2:
            return name, bool("transB" in attrs and attrs["transB"].i)
    return None


def _fold_into_layernorm(node: Any, inits: dict[str, Any], s: np.ndarray, new_inits: list[Any]) -> bool:
    """Divide a ``LayerNormalization``'s constant scale and bias (one value per channel) by ``s``."""
    from onnx import numpy_helper

    if len(node.input) < 3 or not all(i in inits for i in node.input[1:3]):
        return False
    params = [numpy_helper.to_array(inits[i]).astype(np.float32) for i in node.input[1:3]]
    if any(q.shape != s.shape for q in params):
        return False
    for j, q in zip((1, 2), params, strict=True):
        name = f"{node.input[j]}_smoothed_{node.name or node.output[0]}"
        new_inits.append(numpy_helper.from_array(q / s, name))
        node.input[j] = name
    return True


def _fold_into_mul(
    node: Any,
    inits: dict[str, Any],
    s: np.ndarray,
    new_inits: list[Any],
    producer: dict[str, Any],
    consumers: dict[str, list[Any]],
    depth: int = 2,
) -> Any:
    """Divide a ``Mul``'s constant operand (a scalar or one value per last-axis channel) by ``s``: exact, no new
    node. Through a chain of ``Mul`` nodes private to this one (exported GELU: ``x * (0.5 * (1 + erf(...)))``).
    Returns the ``Mul`` node whose constant changed, or None."""
    from onnx import numpy_helper

    for j in (0, 1):
        name = node.input[j]
        if name not in inits:
            continue
        c = numpy_helper.to_array(inits[name])
        if c.dtype != np.float32 or c.size not in (1, len(s)) or (c.size == len(s) and c.shape[-1] != len(s)):
            continue
        new = f"{name}_smoothed_{node.name or node.output[0]}"
        new_inits.append(numpy_helper.from_array((c.reshape(-1) / s).astype(np.float32), new))
        node.input[j] = new
        return node
    if depth == 0:
        return None
    for j in (0, 1):
        up = producer.get(node.input[j])
        if up is not None and up.op_type == "Mul" and [id(c) for c in consumers[node.input[j]]] == [id(node)]:
            done = _fold_into_mul(up, inits, s, new_inits, producer, consumers, depth - 1)
            if done is not None:
                return done
    return None


def _channel_absmax(src: Path, names: list[str], x: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """Per last-axis channel max |value| of the tensors ``names`` over the inputs ``x``."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(src))
    have = {o.name for o in model.graph.output}
    for n in names:
        if n not in have:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = [o.name for o in sess.get_outputs()]
    idx = [outs.index(n) for n in names]
    rows = len(next(iter(x.values())))
    amax: dict[str, np.ndarray] = {}
    for i in range(0, rows, batch):
        got = sess.run(None, {k: v[i : i + batch] for k, v in x.items()})
        for n, j in zip(names, idx, strict=True):
            a = np.abs(np.asarray(got[j], np.float32)).reshape(-1, got[j].shape[-1]).max(0)
            amax[n] = a if n not in amax else np.maximum(amax[n], a)
    return amax


def smooth_matmuls(
    src: Path,
    dst: Path,
    x: dict[str, np.ndarray],
    alpha: float = 0.5,
    *,
    batch: int = 16,
    exclude: list[str] | None = None,
    min_ratio: float = 1.0,
) -> SmoothReport:
    """Write ``src`` with its constant-weight MatMul/Gemm inputs smoothed to ``dst``; ``x`` feeds every input.

    ``exclude``: MatMul/Gemm node names left alone. ``min_ratio``: an activation whose largest channel maximum is
    below ``min_ratio`` times its median channel maximum has no outlier channels to move and is left alone
    (counted in ``skipped``). Nodes whose activation has a channel count other than the
    weight's rows (a batched MatMul) are skipped, as are activations that are graph inputs or initializers.
    """
    import onnx
    from onnx import numpy_helper

    from keiryo.export.onnx import save_onnx, toposort

    if not 0.0 <= alpha <= 1.0:
        raise PassError(f"smoothing alpha {alpha}: expected a value in [0, 1]")
    if not x or len(next(iter(x.values()))) == 0:
        raise DataError("activation smoothing needs calibration inputs; got none")
    model = onnx.load(str(src))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    graph_inputs = {i.name for i in g.input}
    skip = set(exclude or [])
    groups: dict[str, list[tuple[Any, str, bool]]] = defaultdict(list)
    for node in g.node:
        if node.op_type not in ("MatMul", "Gemm") or node.name in skip:
            continue
        found = _weight(node, inits)
        act = node.input[0]
        if found is None or act in inits or act in graph_inputs:
            continue
        groups[act].append((node, *found))
    report = SmoothReport(alpha)
    if not groups:
        save_onnx(model, dst)
        return report
    amax = _channel_absmax(src, sorted(groups), x, batch)
    consumers: dict[str, list[Any]] = defaultdict(list)
    producer: dict[str, Any] = {}
    for node in g.node:
        for i in node.input:
            consumers[i].append(node)
        for o in node.output:
            producer[o] = node
    outputs = {o.name for o in g.output}
    new_inits: list[Any] = []
    new_nodes: list[Any] = []
    weights_done: dict[str, str] = {}
    for act, members in groups.items():
        weights = {}
        for _node, wname, trans in members:
            w = numpy_helper.to_array(inits[wname]).astype(np.float32)
            weights[wname] = w.T if trans else w  # (K, N)
        k = len(amax[act])
        if any(w.shape[0] != k for w in weights.values()):
            continue
        if any(wname in weights_done for wname in weights):
            continue  # a weight shared with another activation's MatMul: scaling it twice would be wrong
        a = np.maximum(amax[act], 1e-8)
        ratio = float(a.max() / max(float(np.median(a)), 1e-8))
        if ratio < min_ratio:
            report.skipped.append(act)
            continue
        wmax = np.max(np.stack([np.abs(w).max(1) for w in weights.values()]), 0)
        wmax = np.maximum(wmax, 1e-8)
        s = np.clip(a**alpha / wmax ** (1.0 - alpha), MIN_SCALE, MAX_SCALE).astype(np.float32)
        s[~np.isfinite(s)] = 1.0
        report.max_activation_ratio = max(report.max_activation_ratio, ratio)
        # the MatMuls' weights: rows times s (a fresh initializer: the original may be read elsewhere)
        for node, wname, trans in members:
            if wname not in weights_done:
                w = weights[wname] * s[:, None]
                new = f"{wname}_smoothed"
                new_inits.append(numpy_helper.from_array((w.T if trans else w).astype(np.float32), new))
                weights_done[wname] = new
            node.input[1] = weights_done[wname]
            report.matmuls.append(node.name)
        prod = producer.get(act)
        member_ids = {id(m[0]) for m in members}
        if prod is not None and act not in outputs and all(id(c) in member_ids for c in consumers[act]):
            folded = None
            if prod.op_type == "LayerNormalization" and _fold_into_layernorm(prod, inits, s, new_inits):
                folded = prod
            elif prod.op_type == "Mul":
                folded = _fold_into_mul(prod, inits, s, new_inits, producer, consumers)
            if folded is not None:
                if not folded.name:
                    folded.name = f"smooth_folded/{folded.output[0]}"
                report.folded_into.append(folded.name)
                continue
        inv = f"{act}_smooth_inv"
        out = f"{act}_smoothed"
        new_inits.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
        mul = onnx.helper.make_node("Mul", [act, inv], [out], name=f"smooth_mul/{act}")
        for node, _, _ in members:
            node.input[0] = out
        new_nodes.append(mul)
        report.mul_nodes.append(mul.name)
    g.initializer.extend(new_inits)
    g.node.extend(new_nodes)
    toposort(model)
    # drop the original weights and LayerNorm parameters no node reads any more
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used or i.name in outputs]
    del g.initializer[:]
    g.initializer.extend(keep)
    save_onnx(model, dst)
    return report


def float_inputs(qdq: Path, nodes: list[str]) -> int:
    """Rewire the smoothing nodes of a QDQ file to read their float inputs, not a ``DequantizeLinear`` of them.

    ``quantize_static`` puts one QuantizeLinear/DequantizeLinear pair on a tensor that any quantized consumer
    reads (a LayerNorm output that a quantized residual Add also reads), and every consumer then reads the
    dequantized copy, the excluded ``Mul`` too: the outlier channels would be rounded on the per-tensor grid
    before smoothing could help. Returns how many inputs were rewired."""
    import onnx

    from keiryo.export.onnx import save_onnx

    model = onnx.load(str(qdq))
    producer = {o: n for n in model.graph.node for o in n.output}
    names = set(nodes)
    done = 0
    for n in model.graph.node:
        if n.name not in names:
            continue
        for j, i in enumerate(n.input):
            dq = producer.get(i)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue
            n.input[j] = q.input[0]
            done += 1
    if done:
        save_onnx(model, qdq)
    return done
