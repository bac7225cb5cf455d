"""Format-level weight compression of Core ML packages with ``coremltools.optimize.coreml``.

- ``coreml.int8_weights``: linear int8 weights (per channel), dequantized on load.
- ``coreml.palettize``: n-bit look-up-table weights. When the model went through keiryo's
  ``cluster`` pass, each weight whose distinct values fit the table is stored with *exactly*
  those centroids (``mode="unique"``); other weights get k-means palettes.
- ``coreml.sparse``: zeros (from pruning) stored sparsely (bitmask + non-zeros).

Each result is validated structurally: the promised compression ops must be in the program.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from keiryo.config import KeiryoConfig
from keiryo.errors import PassError, first_line
from keiryo.export import Artifact
from keiryo.passes import PassContext, PassResult, register_pass


class CoremlInt8Config(KeiryoConfig):
    mode: Literal["linear_symmetric", "linear"] = "linear_symmetric"
    weight_threshold: int = Field(2048, ge=0, description="leave weights with fewer elements uncompressed")


class CoremlPalettizeConfig(KeiryoConfig):
    nbits: Literal[1, 2, 3, 4, 6, 8] = 4
    use_cluster_centroids: bool = Field(True, description="store the cluster pass's centroids exactly where they fit")
    weight_threshold: int = Field(2048, ge=0)


class CoremlSparseConfig(KeiryoConfig):
    min_sparsity: float = Field(0.3, ge=0, le=1, description="store a weight sparsely only from this share of zeros")
    weight_threshold: int = Field(2048, ge=0)


def _compress(
    model: Artifact, ctx: PassContext, tag: str, kind: str, threshold: int, build: Any
) -> tuple[Artifact, dict[str, Any]]:
    from keiryo._quiet import quiet, silence_native_output
    from keiryo.export.coreml import coremltools, save_package, validate_mlpackage, weights_bytes

    ct = coremltools()
    out = ctx.out_path(tag, ".mlpackage")
    try:
        with quiet("coremltools"), silence_native_output():
            src = ct.models.MLModel(str(model.path), skip_model_load=True)
            compressed, details = build(ct, src)
            save_package(compressed, out)
    except PassError:
        raise
    except Exception as e:
        first = first_line(e)
        raise PassError(f"coreml.{tag} failed on {model.path.name}: {type(e).__name__}: {first[:300]}") from e
    try:
        info = validate_mlpackage(out, inputs=model.info.get("inputs"), outputs=model.info.get("outputs"))
        if not info["compressed_weight_ops"].get(kind):
            raise PassError(
                f"coreml.{tag} on {model.path.name}: no weight was compressed; weights with fewer than "
                f"{threshold} elements are left as they are (lower weight_threshold to include them)"
            )
    except Exception:
        shutil.rmtree(out, ignore_errors=True)
        raise
    before = weights_bytes(Path(model.path))
    info.update(details)
    info["weights_ratio"] = round(before / max(info["weights_bytes"], 1), 3)
    keep = {k: v for k, v in model.info.items() if k in ("precision", "clustered")}
    return Artifact(out, "coreml", "coreml", list(model.input_names), list(model.output_names), {**keep, **info}), info


@register_pass("coreml.int8_weights", CoremlInt8Config, stage="coreml", summary="Core ML int8 weights (linear, per channel)")
def coreml_int8(model: Artifact, cfg: CoremlInt8Config, ctx: PassContext) -> PassResult:
    def build(ct: Any, src: Any) -> tuple[Any, dict[str, Any]]:
        from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

        op = OpLinearQuantizerConfig(mode=cfg.mode, dtype="int8", weight_threshold=cfg.weight_threshold)
        return linear_quantize_weights(src, OptimizationConfig(global_config=op)), {"weights": "int8", "mode": cfg.mode}

    art, info = _compress(model, ctx, "int8_weights", "int8", cfg.weight_threshold, build)
    return PassResult(art, info)


@register_pass("coreml.palettize", CoremlPalettizeConfig, stage="coreml", summary="Core ML n-bit palettes (cluster centroids)")
def coreml_palettize(model: Artifact, cfg: CoremlPalettizeConfig, ctx: PassContext) -> PassResult:
    def build(ct: Any, src: Any) -> tuple[Any, dict[str, Any]]:
        from coremltools.optimize.coreml import (
            OpPalettizerConfig,
            OptimizationConfig,
            get_weights_metadata,
            palettize_weights,
        )

        kmeans = OpPalettizerConfig(mode="kmeans", nbits=cfg.nbits, weight_threshold=cfg.weight_threshold)
        per_op: dict[str, OpPalettizerConfig] = {}
        exact = 0
        if cfg.use_cluster_centroids and model.info.get("clustered"):
            meta = get_weights_metadata(src, weight_threshold=cfg.weight_threshold)
            for name, m in meta.items():
                if m.unique_values <= 2**cfg.nbits:
                    per_op[name] = OpPalettizerConfig(mode="unique", weight_threshold=cfg.weight_threshold)
                    exact += 1
        config = OptimizationConfig(global_config=kmeans, op_name_configs=per_op or None)
        details = {"nbits": cfg.nbits, "weights_with_cluster_centroids": exact}
        return palettize_weights(src, config), details

    art, info = _compress(model, ctx, "palettize", "palettized", cfg.weight_threshold, build)
    return PassResult(art, info)


@register_pass("coreml.sparse", CoremlSparseConfig, stage="coreml", summary="Core ML sparse weights (stores pruning's zeros)")
def coreml_sparse(model: Artifact, cfg: CoremlSparseConfig, ctx: PassContext) -> PassResult:
    def build(ct: Any, src: Any) -> tuple[Any, dict[str, Any]]:
        from coremltools.optimize.coreml import OpThresholdPrunerConfig, OptimizationConfig, prune_weights

        op = OpThresholdPrunerConfig(
            threshold=1e-12, minimum_sparsity_percentile=cfg.min_sparsity, weight_threshold=cfg.weight_threshold
        )
        return prune_weights(src, OptimizationConfig(global_config=op)), {"min_sparsity": cfg.min_sparsity}

    art, info = _compress(model, ctx, "sparse", "sparse", cfg.weight_threshold, build)
    return PassResult(art, info)
