#!/usr/bin/env python
"""Can fine-tuning the shipped int8 file itself, every rounding of it simulated, lower its error? (EfficientNet-Lite)

The QAT rung trains the torch model, whose fake-quant points are not all the file's (the residual sums, the layers
fused at export). Here :class:`QdqModule` is a differentiable torch replica of the QDQ ONNX file: each activation's
``QuantizeLinear`` -> ``DequantizeLinear`` pair is ``torch.fake_quantize_per_tensor_affine`` with the file's scale
and zero point (straight-through gradient; with ``--train scales``, LSQ's learnable scale), each int8 weight a float
parameter held on its grid by ``torch.fake_quantize_per_channel_affine`` with the file's scales, each bias (and the
weights of layers kept float) a plain parameter. It is trained against the fp32 file's logits on the calibration
crops (KL, no labels) by plain gradient steps, each tensor's step size set from its first gradient so that a step
moves it by ``--step`` of its mean magnitude, and written back into the file on the same grids (:meth:`QdqModule.write`)
after every epoch, so every figure is onnxruntime's.

    .venv/bin/python bench/qdq_finetune.py --model lite0 --train bias,scales   # ~8 min for the refit + ~1 min an epoch

Before training it prints how far the replica is from onnxruntime on the same file, and how far onnxruntime's int8
kernels are from the same file's QDQ graph run in float (graph optimizations off): two faithful executions of one
int8 file, whose rounding ties fall differently.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from agreement_floor import build_refit, errors, logits  # noqa: E402

INT_RANGES = {
    np.dtype(np.uint8): (0, 255),
    np.dtype(np.int8): (-128, 127),
    np.dtype(np.uint16): (0, 65535),
    np.dtype(np.int16): (-32768, 32767),
}
# the inputs that are a layer's weight or bias: trainable where they are float initializers or int8 behind a DQ
WEIGHT_INPUTS = {"Conv": (1, 2), "Gemm": (1, 2)}


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _pads(x: torch.Tensor, pads: list[int], value: float = 0.0, mode: str = "constant") -> torch.Tensor:
    """ONNX pads (all begins, then all ends) applied with torch's F.pad (last axis first)."""
    n = len(pads) // 2
    tp: list[int] = []
    for i in reversed(range(n)):
        tp += [pads[i], pads[i + n]]
    if not any(tp):
        return x
    return F.pad(x, tp, mode=mode, value=value) if mode == "constant" else F.pad(x, tp, mode=mode)


def _conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, **a: Any) -> torch.Tensor:
    nd = w.dim() - 2
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise ValueError(f"Conv auto_pad={a['auto_pad']!r} is not supported here (export with explicit pads)")
    pads = list(a.get("pads", [0] * 2 * nd))
    x = _pads(x, pads)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return conv(x, w, b, list(a.get("strides", [1] * nd)), 0, list(a.get("dilations", [1] * nd)), a.get("group", 1))


def _gemm(a_: torch.Tensor, b_: torch.Tensor, c: torch.Tensor | None = None, **a: Any) -> torch.Tensor:
    if a.get("transA", 0):
        a_ = a_.t()
    if a.get("transB", 0):
        b_ = b_.t()
    y = a.get("alpha", 1.0) * (a_ @ b_)
    return y if c is None else y + a.get("beta", 1.0) * c


def _mean(x: torch.Tensor, axes_in: torch.Tensor | None = None, **a: Any) -> torch.Tensor:
    axes = list(a["axes"]) if "axes" in a else [] if axes_in is None else [int(v) for v in axes_in.tolist()]
    return x.mean(dim=[int(v) for v in axes], keepdim=bool(a.get("keepdims", 1)))


def _clip(x: torch.Tensor, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None, **a: Any) -> torch.Tensor:
    return torch.clamp(x, a.get("min", None if lo is None else float(lo)), a.get("max", None if hi is None else float(hi)))


def _reshape(x: torch.Tensor, shape: torch.Tensor, **a: Any) -> torch.Tensor:
    return x.reshape([x.shape[i] if v == 0 else v for i, v in enumerate(int(v) for v in shape.tolist())])


def _pad(x: torch.Tensor, pads: torch.Tensor, value: torch.Tensor | None = None, *rest: Any, **a: Any) -> torch.Tensor:
    return _pads(x, [int(v) for v in pads.tolist()], 0.0 if value is None or value.numel() == 0 else float(value))


# the ops of EfficientNet-Lite's int8 files (and a few more a CNN's have); any other: a one-line error
OPS: dict[str, Callable[..., torch.Tensor]] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "Add": lambda a, b: a + b,
    "Mul": lambda a, b: a * b,
    "Relu": lambda x: F.relu(x),
    "Clip": _clip,
    "ReduceMean": _mean,
    "GlobalAveragePool": lambda x: x.mean(dim=list(range(2, x.dim())), keepdim=True),
    "Flatten": lambda x, **a: x.reshape(int(np.prod(x.shape[: a.get("axis", 1)])), -1),
    "Reshape": _reshape,
    "Pad": _pad,
}


class QdqModule(nn.Module):
    """The QDQ ONNX model ``model`` (an ``onnx.ModelProto``) as a torch module whose forward takes the graph inputs by
    name and returns the graph outputs in order (:mod:`keiryo.passes.qdq_torch`)."""

    def __init__(self, model: Any, learn_ranges: bool = False) -> None:
        super().__init__()
        from onnx import numpy_helper

        g = model.graph
        self.graph = g
        self.outputs = [o.name for o in g.output]
        inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for node in g.node:  # Constant nodes hold values too
            if node.op_type == "Constant":
                inits[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
        consumers: dict[str, list[Any]] = {}
        for node in g.node:
            for i in node.input:
                consumers.setdefault(i, []).append(node)
        bad = sorted({n.op_type for n in g.node} - set(OPS) - {"QuantizeLinear", "DequantizeLinear", "Constant"})
        if bad:
            raise ValueError(f"the int8 file has ops the torch replica does not run: {', '.join(bad)}")
        # which initializers train: int8 weights behind a DQ, biases, float weights of layers the file keeps float
        layer_inputs = {
            node.input[i] for node in g.node for i in WEIGHT_INPUTS.get(node.op_type, ()) if i < len(node.input) and node.input[i]
        }
        self.params = nn.ParameterDict()
        self.grids: dict[str, tuple[str, torch.Tensor, torch.Tensor, int, int, int]] = {}  # weight -> fake-quant args
        self.consts: dict[str, torch.Tensor] = {}
        self.dq_weights: dict[str, str] = {}  # DQ output -> the int8 initializer behind it
        self._key: dict[str, str] = {}
        for node in g.node:
            if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
                continue
            q = inits[node.input[0]]
            scale = np.asarray(inits[node.input[1]], np.float32)
            zp = np.asarray(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else np.zeros((), q.dtype)
            shape = _bshape(scale, q, _attrs(node).get("axis", 1))
            w = (q.astype(np.float64) - zp.astype(np.float64).reshape(shape)) * scale.astype(np.float64).reshape(shape)
            if node.output[0] not in layer_inputs:
                self.consts[node.output[0]] = torch.from_numpy(w.astype(np.float32))
                continue
            key = self._param(node.input[0], w.astype(np.float32))
            self.dq_weights[node.output[0]] = node.input[0]
            if q.dtype in INT_RANGES and q.dtype.itemsize == 1:
                lo, hi = INT_RANGES[q.dtype]
                axis = _attrs(node).get("axis", 1) % q.ndim if scale.ndim else -1
                self.grids[key] = (
                    node.output[0],
                    torch.from_numpy(scale.reshape(-1)),
                    torch.from_numpy(zp.reshape(-1).astype(np.int32)),
                    axis,
                    lo,
                    hi,
                )
        for name, arr in inits.items():
            if name in self._key or name in self.consts:
                continue
            if name in layer_inputs and arr.dtype == np.float32:
                self._param(name, arr)
            else:
                self.consts[name] = torch.from_numpy(np.array(arr))
        self.act: dict[str, tuple[float, int, int, int]] = {}  # Q output -> (scale, zero point, qmin, qmax)
        for node in g.node:
            if node.op_type != "QuantizeLinear":
                continue
            a_scale = inits.get(node.input[1])
            a_zp = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
            if a_scale is None or np.asarray(a_scale).size != 1 or a_zp is None:
                raise ValueError(f"QuantizeLinear {node.name!r}: only per-tensor activation scales are run here")
            for c in consumers.get(node.output[0], []):
                if c.op_type != "DequantizeLinear" or c.input[1] != node.input[1]:
                    raise ValueError(f"QuantizeLinear {node.name!r} feeds {c.op_type} {c.name!r}, not its own DequantizeLinear")
            lo, hi = INT_RANGES[np.asarray(a_zp).dtype]
            self.act[node.output[0]] = (float(np.asarray(a_scale).reshape(())), int(np.asarray(a_zp).reshape(())), lo, hi)
        self.scales = nn.ParameterDict()  # Q output -> its learned scale (LSQ), where ranges are learned
        self._scale_init: dict[str, str] = {}
        if learn_ranges:
            for node in g.node:
                if node.op_type == "QuantizeLinear":
                    key = f"s{len(self.scales)}"
                    self.scales[key] = nn.Parameter(torch.tensor([self.act[node.output[0]][0]], dtype=torch.float32))
                    self._scale_init[node.output[0]] = key

    def _param(self, name: str, arr: np.ndarray) -> str:
        key = f"p{len(self.params)}"
        self.params[key] = nn.Parameter(torch.from_numpy(np.array(arr, dtype=np.float32)))
        self._key[name] = key
        return key

    def weight(self, key: str) -> torch.Tensor:
        """Parameter ``key`` as the file would hold it: on its int8 grid (straight-through) where it is one."""
        p = self.params[key]
        if key not in self.grids:
            return p
        _, scale, zp, axis, lo, hi = self.grids[key]
        if axis < 0:
            return torch.fake_quantize_per_tensor_affine(p, float(scale[0]), int(zp[0]), lo, hi)
        return torch.fake_quantize_per_channel_affine(p, scale, zp, axis, lo, hi)

    def forward(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        env: dict[str, torch.Tensor] = dict(self.consts)
        for dq, init in self.dq_weights.items():
            env[dq] = self.weight(self._key[init])
        for name, key in self._key.items():
            if key not in self.grids:
                env[name] = self.params[key]
        env.update(feeds)
        for node in self.graph.node:
            op = node.op_type
            if op == "Constant" or node.output[0] in env:
                continue
            if op == "QuantizeLinear":
                s, zp, lo, hi = self.act[node.output[0]]
                x = env[node.input[0]]
                learned = self._scale_init.get(node.output[0])
                if learned is None:
                    env[node.output[0]] = torch.fake_quantize_per_tensor_affine(x, s, zp, lo, hi)
                else:  # LSQ: the gradient reaches the scale too (Esser et al. 2020's grad scale)
                    g = 1.0 / float(np.sqrt(x[0].numel() * hi))
                    z = torch.tensor([float(zp)])
                    env[node.output[0]] = torch._fake_quantize_learnable_per_tensor_affine(x, self.scales[learned], z, lo, hi, g)
            elif op == "DequantizeLinear":  # of an activation: its QuantizeLinear did the rounding
                env[node.output[0]] = env[node.input[0]]
            else:
                args = [env[i] if i else None for i in node.input]
                while args and args[-1] is None:
                    args.pop()
                env[node.output[0]] = OPS[op](*args, **_attrs(node))
        return [env[o] for o in self.outputs]

    def write(self, model: Any) -> dict[str, int]:
        """Put the trained parameters back into ``model`` (the file this module was built from, or a copy): int8
        weights rounded on their grids, int32 biases on theirs, float ones as they are. Returns how many int8
        weights changed level, and of how many."""
        from onnx import numpy_helper

        by_name = {t.name: t for t in model.graph.initializer}
        dq = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
        moved = total = 0
        for name, key in self._key.items():
            p = self.params[key].detach().double().numpy()
            old = numpy_helper.to_array(by_name[name])
            if name in dq and old.dtype != np.float32:
                node = dq[name]
                scale = numpy_helper.to_array(by_name[node.input[1]]).astype(np.float64)
                zp = (
                    numpy_helper.to_array(by_name[node.input[2]])
                    if len(node.input) > 2 and node.input[2]
                    else np.zeros((), old.dtype)
                )
                shape = _bshape(scale, old, _attrs(node).get("axis", 1))
                info = np.iinfo(old.dtype)
                new = np.clip(
                    np.round(p / scale.reshape(shape)) + zp.astype(np.float64).reshape(shape), info.min, info.max
                ).astype(old.dtype)
                if old.dtype.itemsize == 1:
                    moved += int((new != old).sum())
                    total += new.size
            else:
                new = p.astype(old.dtype)
            by_name[name].CopyFrom(numpy_helper.from_array(new, name))
        q_scale = {n.output[0]: n.input[1] for n in model.graph.node if n.op_type == "QuantizeLinear"}
        for out, key in self._scale_init.items():
            name = q_scale[out]
            v = np.asarray(abs(float(self.scales[key].detach()[0])), np.float32)
            by_name[name].CopyFrom(numpy_helper.from_array(v.reshape(numpy_helper.to_array(by_name[name]).shape), name))
        return {"weights_moved": moved, "weights": total}


def _bshape(scale: np.ndarray, q: np.ndarray, axis: int) -> tuple[int, ...]:
    """The shape that broadcasts a per-axis ``scale`` over ``q`` (a scalar's: ())."""
    if scale.ndim == 0 or scale.size == 1 and q.ndim == 0:
        return ()
    shape = [1] * q.ndim
    shape[axis % q.ndim] = scale.size
    return tuple(shape)


def train(
    sim: QdqModule,
    model: Any,
    x: np.ndarray,
    t: np.ndarray,
    what: set[str],
    step: float,
    epochs: int,
    batch: int,
    out: Path,
    check: Callable[[Path], str],
) -> None:
    """Gradient steps on the KL to the fp32 logits ``t`` of ``x``; the file written to ``out`` and ``check``-ed after
    every epoch."""
    import copy
    import time

    import onnx

    def kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.kl_div(torch.log_softmax(s, 1), torch.log_softmax(t, 1), log_target=True, reduction="batchmean")

    params = [p for k, p in sim.params.items() if k in sim.grids] if "weights" in what else []
    params += [p for k, p in sim.params.items() if k not in sim.grids and p.dim() == 1] if "bias" in what else []
    params += list(sim.scales.parameters()) if "scales" in what else []
    kl(sim({"image": torch.from_numpy(x[:32])})[0], torch.from_numpy(t[:32])).backward()
    lrs = {p: step * float(p.detach().abs().mean()) / (float(p.grad.abs().mean()) + 1e-20) for p in params if p.grad is not None}
    t0 = time.monotonic()
    for ep in range(epochs):
        sim.zero_grad(set_to_none=True)
        order, losses = np.random.default_rng(ep).permutation(len(x)), []
        for i in range(0, len(x) - batch + 1, batch):
            j = order[i : i + batch]
            loss = kl(
                sim({"image": torch.from_numpy(x[j]).contiguous(memory_format=torch.channels_last)})[0], torch.from_numpy(t[j])
            )
            loss.backward()
            losses.append(float(loss.detach()))
            with torch.no_grad():
                for p, lr in lrs.items():
                    p -= lr * p.grad
            sim.zero_grad(set_to_none=True)
        m = copy.deepcopy(model)
        moved = sim.write(m)["weights_moved"]
        onnx.save(m, str(out))
        print(
            f"epoch {ep + 1}: training KL {np.mean(losses):.5f}, {moved} int8 weights moved, {check(out)} ({time.monotonic() - t0:.0f} s)",
            flush=True,
        )


def main() -> int:
    import argparse
    import tempfile

    import onnx

    from keiryo.data import DataSpec, load_data
    from keiryo.export import export
    from keiryo.model import load_model
    from keiryo.passes.quantize_ort import preprocess

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--model", default="lite0")
    ap.add_argument(
        "--file", type=Path, help="an int8 QDQ file of --model (default: the refit, first 2 layers float, built here)"
    )
    ap.add_argument("--train", default="bias,scales", help="comma-separated: bias, scales, weights")
    ap.add_argument("--step", type=float, default=1e-5, help="each step moves a tensor by this share of its mean |value|")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    models = Path(__file__).parent / "models"
    spec = DataSpec(
        source=f"{models / 'natural_images.py'}:crops",
        options={"model": args.model, "test": 1000},
        eval_size=1000,
        calib_size=256,
        val_size=200,
        seed=0,
    )
    data = load_data(spec)
    work = Path(tempfile.mkdtemp(prefix="keiryo-bench-qdq-"))
    h = load_model(f"{models / 'efficientnet_lite.py'}:{args.model}", data, output_name="logits")
    pre = preprocess(export(h, "onnx", work / "fp32.onnx").path, work / "pre.onnx")
    xc, xt = data.calib.numpy()["image"], data.test.numpy()["image"]
    xv = data.val.materialize().numpy()["image"]  # type: ignore[attr-defined]
    src = args.file or build_refit(pre, work / "refit-f2.onnx", {"image": xc})
    tc, tv, tt = logits(pre, xc), logits(pre, xv), logits(pre, xt)

    def fmt(e: tuple[float, float, float]) -> str:
        return f"agreement {e[0]:.1f}%, logit error {e[1] * 100:.2f}%"

    model = onnx.load(str(src))
    sim = QdqModule(model, learn_ranges="scales" in args.train)
    with torch.no_grad():
        ys = np.concatenate([sim({"image": torch.from_numpy(xt[i : i + 50])})[0].numpy() for i in range(0, len(xt), 50)])
    yo = logits(src, xt)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    yf = np.concatenate(
        [ort.InferenceSession(str(src), so).run(None, {"image": xt[i : i + 50]})[0] for i in range(0, len(xt), 50)]
    )
    print(f"{len(xt)} test crops, {src.name}: onnxruntime vs fp32: {fmt(errors(yo, tt))}")
    print(f"  the torch replica vs fp32: {fmt(errors(ys, tt))}; vs onnxruntime: {fmt(errors(ys, yo))}")
    print(f"  onnxruntime's int8 kernels vs the same file's QDQ graph in float (no graph optimization): {fmt(errors(yo, yf))}")
    print(f"validation ({len(xv)} crops) before training: {fmt(errors(logits(src, xv), tv))}", flush=True)
    train(
        sim,
        model,
        xc,
        tc,
        set(args.train.split(",")),
        args.step,
        args.epochs,
        args.batch,
        work / "tuned.onnx",
        lambda f: "validation " + fmt(errors(logits(f, xv), tv)),
    )
    print(f"test crops after training: {fmt(errors(logits(work / 'tuned.onnx', xt), tt))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
