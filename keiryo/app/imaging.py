"""What the page needs to feed a package's model an image: the manifest's preprocessing as a spec the page
applies (``web/src/preprocess.js``), or the reason the package is not an image classifier the page can drive."""

from __future__ import annotations

from typing import Any

IMAGE_DATATYPES = {"FP32"}


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def image_spec(manifest: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(spec, None) for an image classifier with one (N, C, H, W) float input and a (N, classes) output;
    (None, reason) otherwise."""
    task = (manifest.get("task") or {}).get("name") if isinstance(manifest.get("task"), dict) else manifest.get("task")
    if task not in (None, "classification"):
        return None, f"a {task} model, not an image classifier"
    inputs, outputs = manifest.get("inputs") or [], manifest.get("outputs") or []
    if len(inputs) != 1:
        return None, f"{len(inputs)} inputs; the page feeds one image"
    x = inputs[0]
    shape = list(x.get("shape") or [])
    if x.get("datatype") not in IMAGE_DATATYPES or len(shape) != 4:
        return None, f"input {x.get('name')!r} is {x.get('datatype')} {shape}, not a float (batch, channels, height, width) image"
    c, h, w = (_int(d) for d in shape[1:])
    if c not in (1, 3) or h is None or w is None:
        return None, f"input {x.get('name')!r} has shape {shape}; expected 1 or 3 channels and a fixed height and width"
    if len(outputs) != 1 or len(outputs[0].get("shape") or []) != 2:
        return None, "the output is not one (batch, classes) tensor of class scores"
    classes = _int(outputs[0]["shape"][1])
    labels = list(manifest.get("labels") or [])
    if classes is None or classes < 2:
        return None, f"output {outputs[0].get('name')!r} has shape {outputs[0]['shape']}; expected (batch, classes)"
    labels = labels if len(labels) == classes else [str(i) for i in range(classes)]
    prep = manifest.get("preprocessing") or {}
    spec: dict[str, Any] = {"channels": c, "height": h, "width": w, "fit": "stretch"}
    spec.update(resize=None, grid=None, levels=None)
    if prep.get("source") == "sklearn.load_digits":
        # UCI digits: 32x32 bitmaps, ink counted over 4x4 blocks (0..16), light ink on black, then resized
        spec.update(fit="bbox", grid=8, levels=16, channel_order="grey")
    else:
        crop = prep.get("crop")
        resize = prep.get("resize") or ""
        if crop and "shorter side to" in str(resize):
            spec.update(fit="crop", resize=int(str(resize).split("shorter side to", 1)[1].split(",")[0]))
        spec["channel_order"] = prep.get("channel_order") or ("grey" if c == 1 else "RGB")
        for k in ("mean", "std"):
            v = prep.get(k)
            spec[k] = [float(t) for t in v] if isinstance(v, list) and len(v) == c else None
    spec["input"] = {"name": x["name"], "shape": [1, c, h, w]}
    spec["output"] = {"name": outputs[0]["name"]}
    spec["labels"] = labels
    return spec, None


def browser_support(manifest: dict[str, Any]) -> tuple[bool, str | None]:
    """Whether the in-browser engine (onnxruntime-web) can run the package's model, and why not."""
    if manifest.get("format") != "onnx":
        return False, f"a {manifest.get('format')} model; the browser runs ONNX"
    if manifest.get("encryption"):
        return False, "an encrypted package: its plaintext model never leaves the server"
    return True, None
