"""Build a model from a zoo name or a user factory, and load weights safely.

Weights are read from ``.safetensors`` or from a state_dict saved with
``torch.save`` and loaded with ``weights_only=True``: a file that holds pickled
Python objects is refused, never executed.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from keiryo.errors import ConfigError, DataError, InputFileError, ModelLoadError, first_line
from keiryo.model.handle import ModelHandle, ModelSpec
from keiryo.model.io import IOSpec, TensorSpec, infer_outputs


def build_module(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int | None) -> nn.Module:
    """Build the module: a zoo entry, or a user factory given ``input_shape`` / ``num_classes`` if it takes them."""
    if spec.source.startswith("zoo:"):
        from keiryo.model import zoo

        return zoo.build(spec.source[4:], input_shape, num_classes, spec.options)
    from keiryo._imports import resolve_callable

    fn = resolve_callable(spec.source, "model factory")
    kwargs = dict(spec.options)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    for key, value in (("input_shape", tuple(input_shape)), ("num_classes", num_classes)):
        if key in params and key not in kwargs and value is not None:
            kwargs[key] = value
    try:
        module = fn(**kwargs)
    except Exception as e:
        raise ModelLoadError(f"model factory {spec.source!r} raised {type(e).__name__}: {first_line(e)}") from e
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"model factory {spec.source!r} returned a {type(module).__name__}; expected a torch.nn.Module")
    return module


def load_model(
    spec: ModelSpec | str,
    inputs: Any,
    num_classes: int | None = None,
    *,
    options: dict[str, Any] | None = None,
    weights: str | Path | None = None,
    seed: int = 0,
    output_name: str = "output",
) -> ModelHandle:
    """Build the model for ``inputs``, load weights and describe its outputs with one forward pass.

    ``inputs``: the data (:class:`~keiryo.data.DataSplits`), an :class:`IOSpec`, a list of
    :class:`TensorSpec`, or a per-sample shape tuple for one float32 input named ``input``.
    ``num_classes`` (the class or value count) is what a zoo model or a factory that asks
    for it is built with; by default the data's label count or target size. The outputs are
    taken from the model, named after its dict keys or ``output_name``. The initial weights
    are drawn from ``seed`` (without touching the global RNG), so training from scratch is
    reproducible.
    """
    if isinstance(spec, str):
        spec = ModelSpec(source=spec, options=options or {}, weights=str(weights) if weights else None)
    specs = input_specs(inputs)
    if num_classes is None:
        num_classes = outputs_hint(inputs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            first_shape = specs[0].sample_shape
        except DataError:
            first_shape = tuple(d if isinstance(d, int) else 1 for d in specs[0].shape[1:])
        module = build_module(spec, first_shape, num_classes)
    privacy, conversion = None, []
    if spec.weights:
        from keiryo.privacy.dp import apply_conversion, read_weights_conversion, read_weights_privacy

        state = load_weights(spec.weights)
        privacy = read_weights_privacy(spec.weights)  # weights from `keiryo train --dp`: the guarantee travels on
        conversion = read_weights_conversion(spec.weights, privacy)  # the layers replaced for DP-SGD
        if conversion:
            try:
                module = apply_conversion(module, conversion)
            except (AttributeError, KeyError, TypeError, ValueError) as e:
                raise InputFileError(
                    f"{spec.weights}: its recorded layer conversion (for DP-SGD) does not fit {spec.source}: {first_line(e, 200)}"
                ) from e
        apply_state_dict(module, state, spec.weights)
    module.eval()
    outputs = infer_outputs(module, specs, output_name, f"model {spec.source}")
    meta: dict[str, Any] = {"privacy": privacy} if privacy else {}
    if conversion:
        meta["norm_conversion"] = conversion
    return ModelHandle(module, IOSpec(inputs=specs, outputs=outputs), spec, meta)


def input_specs(inputs: Any) -> list[TensorSpec]:
    if isinstance(inputs, IOSpec):
        return list(inputs.inputs)
    if isinstance(inputs, tuple) and all(isinstance(d, int) for d in inputs):
        return [TensorSpec(name="input", dtype="float32", shape=["batch", *inputs])]
    if isinstance(inputs, list) and all(isinstance(t, TensorSpec) for t in inputs):
        return inputs
    if hasattr(inputs, "inputs") and isinstance(inputs.inputs, list):
        return list(inputs.inputs)
    raise ConfigError(f"model inputs: expected data splits, an IOSpec, TensorSpecs or a shape tuple, got {type(inputs).__name__}")


def outputs_hint(inputs: Any) -> int | None:
    """The data's label count (integer labels) or target size (numeric targets), if any."""
    target = getattr(inputs, "target", None)
    if target is None:
        return None
    if target.label_count is not None:
        return max(2, target.label_count)
    size = 1
    for d in target.shape:
        size *= d
    return size


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from .safetensors or a weights-only torch file; refuse pickles."""
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{p}: weights file not found; expected .safetensors or a state_dict .pt")
    if not p.is_file() or not os.access(p, os.R_OK):
        raise InputFileError(f"{p}: not a readable file; expected .safetensors or a state_dict .pt")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise InputFileError(f"{p}: not a valid safetensors file ({e})") from e
    else:
        import pickle

        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ModelLoadError(
                f"{p}: refused: the file contains pickled Python objects, not only tensors "
                f"({first_line(e, 160)}); save model.state_dict() or use .safetensors"
            ) from e
        except Exception as e:
            raise InputFileError(f"{p}: not a readable torch weights file ({type(e).__name__}: {first_line(e, 200)})") from e
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ModelLoadError(f"{p}: expected a state_dict (a mapping of names to tensors), got {type(obj).__name__}")
        state = obj
    bad = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ModelLoadError(f"{p}: weights contain NaN/Inf in {len(bad)} tensor(s): {', '.join(bad[:5])}")
    return state


def apply_state_dict(module: nn.Module, state: dict[str, torch.Tensor], where: str | Path) -> None:
    """Load ``state`` strictly, listing missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                parts.append(f"{label}: {', '.join(keys[:8])}{more}")
        raise ModelLoadError(f"{where}: weights do not match the model; " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def save_weights(module: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a .safetensors file atomically (temp file + rename)."""
    from safetensors.torch import save_file

    p = Path(path)
    if p.suffix != ".safetensors":
        raise ConfigError(f"{p}: weights are written as .safetensors; give a path ending in .safetensors")
    p.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
