"""Model I/O as data: named inputs and outputs with dtypes and shapes (named dynamic axes).

An :class:`IOSpec` is described once, from the data (inputs) and one forward pass of
the model (outputs), and every layer reads it: export (input/output names, dynamic
axes), calibration readers, runtime sessions, the benchmark, the package manifest
and the server. Shapes include the batch dimension; a dimension is an ``int`` or the
name of a dynamic axis (``"batch"``, ``"seq"``).

How a model is called with named inputs (:func:`call_module`): one input is passed
positionally; several are passed by keyword when every name is a parameter of
``forward``, else positionally in the order of the spec. A model may return a
tensor, a tuple/list of tensors or a dict of tensors (:func:`flatten_outputs`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from keiryo.config import KeiryoConfig
from keiryo.errors import DataError, ModelLoadError

DType = Literal["float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"]
DTYPES: tuple[str, ...] = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")
OIP_DATATYPES = {
    "float32": "FP32",
    "float16": "FP16",
    "float64": "FP64",
    "int64": "INT64",
    "int32": "INT32",
    "int8": "INT8",
    "uint8": "UINT8",
    "bool": "BOOL",
}

Batch = dict[str, torch.Tensor]


class TensorSpec(KeiryoConfig):
    name: str = Field(min_length=1, max_length=128)
    dtype: DType = "float32"
    shape: list[int | str] = Field(description="with the batch dimension; a str names a dynamic axis")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample (no batch dim); dynamic axes other than batch are not allowed here."""
        dims = self.shape[1:]
        if any(isinstance(d, str) for d in dims):
            raise DataError(f"input {self.name!r}: shape {self.shape} has dynamic axes besides batch; give a concrete size")
        return tuple(int(d) for d in dims)  # type: ignore[arg-type]

    @property
    def oip_datatype(self) -> str:
        return OIP_DATATYPES[self.dtype]

    def concrete(self, batch: int = 1, **axes: int) -> tuple[int, ...]:
        out = []
        for i, d in enumerate(self.shape):
            if isinstance(d, int):
                out.append(d)
            elif i == 0 or d == "batch":
                out.append(batch)
            elif d in axes:
                out.append(axes[d])
            else:
                raise DataError(f"tensor {self.name!r}: no size given for dynamic axis {d!r}")
        return tuple(out)


class IOSpec(KeiryoConfig):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec] = Field(default_factory=list)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def describe(self) -> str:
        def one(t: TensorSpec) -> str:
            return f"{t.name}:{t.dtype}[{','.join(map(str, t.shape))}]"

        return f"({', '.join(map(one, self.inputs))}) -> ({', '.join(map(one, self.outputs))})"

    def example_inputs(self, batch: int = 1, *, seed: int | None = None) -> Batch:
        """Inputs of the right names, dtypes and shapes: zeros, or random valid values with ``seed``."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        out: Batch = {}
        for t in self.inputs:
            shape = t.concrete(batch)
            dt = torch_dtype(t.dtype)
            if g is None:
                out[t.name] = torch.ones(shape, dtype=dt) if t.dtype == "bool" else torch.zeros(shape, dtype=dt)
            elif dt.is_floating_point:
                out[t.name] = torch.rand(shape, generator=g).to(dt)
            elif t.dtype == "bool":
                out[t.name] = torch.ones(shape, dtype=dt)
            else:
                out[t.name] = torch.randint(0, 2, shape, generator=g, dtype=dt)
        return out


def dtype_name(dt: torch.dtype | np.dtype | Any) -> str:
    """keiryo's name of a torch or numpy dtype; an unsupported one is a DataError."""
    if isinstance(dt, torch.dtype):
        name = str(dt).removeprefix("torch.")
    else:
        name = np.dtype(dt).name
    if name not in DTYPES:
        raise DataError(f"dtype {name} is not supported; expected one of {', '.join(DTYPES)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _forward_params(module: torch.nn.Module) -> list[str]:
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return []
    return [
        n
        for n, p in sig.parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]


def call_args(module: torch.nn.Module, inputs: Mapping[str, Any], names: Sequence[str]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) for calling ``module`` with ``inputs`` ordered as ``names``."""
    if len(names) == 1:
        return (inputs[names[0]],), {}
    params = _forward_params(module)
    if all(n in params for n in names):
        return (), {n: inputs[n] for n in names}
    return tuple(inputs[n] for n in names), {}


def call_module(module: torch.nn.Module, inputs: Mapping[str, Any], names: Sequence[str] | None = None) -> Any:
    args, kwargs = call_args(module, inputs, list(names or inputs))
    return module(*args, **kwargs)


def flatten_outputs(out: Any, where: str = "model") -> tuple[list[torch.Tensor], list[str] | None]:
    """A model's output as a list of tensors, with names when the model returned a dict."""
    if isinstance(out, torch.Tensor):
        return [out], None
    if isinstance(out, Mapping):
        items = [(str(k), v) for k, v in out.items() if v is not None]
        if items and all(isinstance(v, torch.Tensor) for _, v in items):
            return [v for _, v in items], [k for k, _ in items]
    if isinstance(out, (tuple, list)) and out and all(isinstance(v, torch.Tensor) for v in out):
        return list(out), None
    raise ModelLoadError(
        f"{where} returned a {type(out).__name__}; expected a tensor, a tuple/list of tensors or a dict of tensors"
    )


def output_names_for(count: int, named: list[str] | None, default: str) -> list[str]:
    if named:
        return named
    return [default] if count == 1 else [f"{default}_{i}" for i in range(count)]


def infer_outputs(
    module: torch.nn.Module, inputs: IOSpec | list[TensorSpec], default_name: str, where: str, batch: int = 2
) -> list[TensorSpec]:
    """Run the model once on example inputs and describe its outputs (batch dim named ``batch``)."""
    specs = inputs.inputs if isinstance(inputs, IOSpec) else inputs
    ex = IOSpec(inputs=specs).example_inputs(batch)
    from keiryo.errors import first_line

    try:
        with torch.no_grad():
            raw = call_module(module.eval(), ex, [t.name for t in specs])
    except Exception as e:
        shapes = ", ".join(f"{k} {tuple(v.shape)} {dtype_name(v.dtype)}" for k, v in ex.items())
        params = _forward_params(module)
        raise DataError(
            f"{where} cannot take the data's inputs ({shapes}, batch first) as forward({', '.join(params)}): {first_line(e)}"
        ) from e
    outs, named = flatten_outputs(raw, where)
    names = output_names_for(len(outs), named, default_name)
    result = []
    for n, t in zip(names, outs, strict=True):
        if t.ndim == 0 or t.shape[0] != batch:
            raise ModelLoadError(f"{where}: output {n!r} has shape {tuple(t.shape)} for a batch of {batch}; expected batch first")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ModelLoadError(f"{where} produced NaN/Inf in output {n!r} on an example input; check its weights")
        result.append(TensorSpec(name=n, dtype=dtype_name(t.dtype), shape=["batch", *t.shape[1:]]))  # type: ignore[arg-type]
    return result


def parse_input_spec(text: str) -> TensorSpec:
    """``NAME:DTYPE[d1,d2]`` (per-sample shape, no batch) -> TensorSpec with a dynamic batch axis."""
    import re

    m = re.fullmatch(r"\s*([A-Za-z_][\w.]*)\s*:\s*([a-z0-9]+)\s*\[\s*([0-9,\s]*)\]\s*", text)
    if not m:
        raise DataError(
            f"--input {text!r}: expected NAME:DTYPE[d1,d2,...], e.g. input_ids:int64[128] or image:float32[3,224,224]"
        )
    name, dtype, dims = m.group(1), m.group(2), m.group(3)
    if dtype not in DTYPES:
        raise DataError(f"--input {text!r}: dtype {dtype} is not one of {', '.join(DTYPES)}")
    shape = [int(d) for d in dims.replace(" ", "").split(",") if d]
    if any(d < 1 for d in shape):
        raise DataError(f"--input {text!r}: dimensions must be >= 1")
    return TensorSpec(name=name, dtype=dtype, shape=["batch", *shape])  # type: ignore[arg-type]
