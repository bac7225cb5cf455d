"""Differentially private training: DP-SGD through Opacus (per-sample clipping, Gaussian noise, Poisson sampling).

``TrainConfig.dp`` (``keiryo train --dp``) and the ``train.dp`` block of every training pass (fine-tuning
after pruning or clustering, ``distill``) take a :class:`DPConfig`. The flow, all of it Opacus:

1. :func:`prepare_module`: ``opacus.validators.ModuleValidator.fix`` replaces layers DP-SGD cannot train
   (BatchNorm -> GroupNorm, LSTM -> DPLSTM, ...). keiryo then checks each new GroupNorm: Opacus's default
   (``gcd(32, C)`` groups) puts **one channel per group** in any layer of 16 channels or fewer, which
   normalises every channel of every sample on its own and silently wrecks small models; such layers are
   regrouped to 2+ channels per group (``small_groups: regroup``, reported), refused (``error``) or kept
   with a warning (``warn``). Layers Opacus cannot train at all are named with the fix.
2. :func:`make_private`: the noise multiplier for ``target_epsilon`` over the planned steps
   (``opacus.accountants.utils.get_noise_multiplier``, PRV accountant by default), checked against
   ``max_noise_multiplier`` so an unreachable ε is an error naming the smallest reachable one; then
   ``PrivacyEngine.make_private`` (Poisson sampling).
3. :meth:`DPRun.record`: ε spent from the accountant's history (PRV, with RDP beside it), δ, noise,
   sampling rate, steps, clipping norm: written into the weights file, ``results.json`` and the package
   manifest.

The guarantee covers one record of the **train split** and the weights this run produces (and anything
computed from those weights alone). It does not cover a starting model trained on the same data without DP,
post-training quantization calibrated on the private data, or metrics and golden vectors computed on the
data you give (see docs/privacy.md).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from keiryo.config import KeiryoConfig
from keiryo.errors import ConfigError, InputFileError, PassError, UnsupportedOpError, first_line
from keiryo.privacy._backend import require

log = logging.getLogger("keiryo.privacy")

ACCOUNTANTS = ("prv", "rdp")
PRIVACY_METADATA_KEY = "keiryo.privacy"  # the record's key in a .safetensors file's metadata
# the layers replaced for DP-SGD (BatchNorm -> GroupNorm) in weights trained without DP: `keiryo train --dp-ready`
NORM_CONVERSION_KEY = "keiryo.norm_conversion"


class DPConfig(KeiryoConfig):
    """DP-SGD settings; ``target_epsilon`` is spent over the whole run (all epochs)."""

    target_epsilon: float = Field(gt=0, description="the (epsilon, delta)-DP budget of the whole training run")
    delta: float | None = Field(None, gt=0, lt=1, description="None: 1/N rounded down to a power of ten (N train records)")
    max_grad_norm: float = Field(1.0, gt=0, description="per-sample gradient clipping norm")
    accountant: Literal["prv", "rdp"] = Field("prv", description="accountant that sets the noise; the other is reported")
    poisson_sampling: bool = Field(True, description="Poisson (uniform with replacement) batches, as the analysis assumes")
    max_noise_multiplier: float = Field(
        10.0, gt=0, description="refuse an epsilon that needs more noise than this (the model would learn nothing)"
    )
    small_groups: Literal["regroup", "error", "warn"] = Field(
        "regroup", description="a converted GroupNorm with < 2 channels per group: regroup it, refuse, or warn"
    )
    grad_sample_mode: Literal["auto", "hooks", "ghost"] = Field(
        "auto",
        description="hooks: per-sample gradients materialized (Opacus's default); ghost: ghost clipping, per-sample "
        "gradient norms without materializing them (two backward passes; the same clipping and guarantee); auto: "
        "hooks for a convolutional model whose per-sample gradients fit in 4 GiB, else ghost where it applies (the "
        "task's own loss, batch 16+), else hooks (the faster where measured: bench/privacy.py --timing)",
    )


def _opacus() -> Any:
    opacus = require("opacus", "Opacus (differentially private training)", "privacy")
    from keiryo.privacy.grad_samplers import register

    register()  # convolutions' per-sample gradients and norms at their own cost (grad_samplers.py)
    return opacus


def default_delta(n: int) -> float:
    """1/N rounded down to a power of ten, strictly below 1/N (N = 1437 -> 1e-4, N = 1000 -> 1e-4)."""
    return 10.0 ** -(math.floor(math.log10(n)) + 1)


def resolve_delta(cfg: DPConfig, n: int) -> float:
    delta = cfg.delta if cfg.delta is not None else default_delta(n)
    if delta >= 1.0 / n:
        raise ConfigError(
            f"--delta {delta:g}: must be below 1/N = {1.0 / n:.3g} for {n} training records "
            f"(at delta >= 1/N a mechanism may publish a whole record); try {default_delta(n):g}"
        )
    return delta


def epsilon_of(accountant: str, history: list[tuple[float, float, int]], delta: float) -> float:
    """ε of a DP-SGD history ``[(noise_multiplier, sample_rate, steps)]`` under ``accountant`` (Opacus)."""
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    with warnings.catch_warnings():  # RDP: "optimal order is the largest alpha" (its bound is looser; PRV is the default)
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def noise_multiplier_for(cfg: DPConfig, sample_rate: float, steps: int, delta: float, what: str) -> float:
    """The noise multiplier that spends ``cfg.target_epsilon`` in ``steps``; an unreachable ε is an error
    naming the smallest ε reachable at ``cfg.max_noise_multiplier``."""
    from opacus.accountants.utils import get_noise_multiplier

    floor = epsilon_of(cfg.accountant, [(cfg.max_noise_multiplier, sample_rate, steps)], delta)
    if cfg.target_epsilon < floor:
        raise ConfigError(
            f"--target-epsilon {cfg.target_epsilon:g}: not reachable for {what} ({steps} steps at sampling rate "
            f"{sample_rate:.3g}, delta {delta:g}, {cfg.accountant.upper()} accountant): the smallest reachable epsilon is "
            f"{floor:.3g} (noise multiplier {cfg.max_noise_multiplier:g}); ask for at least that, train fewer epochs, "
            "or use more data"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(
                get_noise_multiplier(
                    target_epsilon=cfg.target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=cfg.accountant,
                )
            )
    except ValueError as e:  # Opacus: "The privacy budget is too low."
        raise ConfigError(f"--target-epsilon {cfg.target_epsilon:g}: {first_line(e)} (smallest reachable {floor:.3g})") from e


# ---- model preparation: layers DP-SGD cannot train -------------------------------------------------------


def _describe(m: nn.Module) -> str:
    if isinstance(m, nn.GroupNorm):
        return f"GroupNorm({m.num_groups}, {m.num_channels})"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return f"{type(m).__name__}({m.num_features})"
    return type(m).__name__


def _groups_of_two(channels: int) -> int | None:
    """The most groups (at most 32, as Opacus) that still hold 2+ channels each; None for one channel."""
    for g in range(min(32, channels // 2), 0, -1):
        if channels % g == 0:
            return g
    return None


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def prepare_module(module: nn.Module, small_groups: str = "regroup") -> tuple[nn.Module, list[dict[str, Any]]]:
    """A copy of ``module`` that DP-SGD can train (``ModuleValidator.fix``), its GroupNorms checked
    (``small_groups``: :attr:`DPConfig.small_groups`), and the conversion layer by layer:
    ``[{layer, from, to, channels_per_group, note?}]``."""
    _opacus()
    from opacus.validators import ModuleValidator

    before = dict(module.named_modules())
    fixed = ModuleValidator.fix(module)
    report: list[dict[str, Any]] = []
    for name, new in list(fixed.named_modules()):
        old = before.get(name)
        if old is None or type(old) is type(new):
            continue
        entry: dict[str, Any] = {"layer": name, "from": _describe(old), "to": _describe(new)}
        if isinstance(new, nn.GroupNorm):
            per = new.num_channels // new.num_groups
            if per < 2:
                groups = _groups_of_two(new.num_channels)
                why = (
                    f"layer {name!r}: {_describe(old)} becomes {_describe(new)}, one channel per group: each channel of "
                    "each sample is normalised on its own, which wrecks small models"
                )
                if small_groups == "error":
                    raise PassError(f"{why}; refused (dp small_groups: error); use small_groups: regroup or widen the layer")
                if small_groups == "warn" or groups is None:
                    if groups is None and small_groups == "regroup":
                        why += " (a single channel cannot be regrouped)"
                    log.warning(why)
                    entry["warning"] = why
                else:
                    new = nn.GroupNorm(groups, new.num_channels, eps=new.eps, affine=new.affine)
                    _replace(fixed, name, new)
                    entry["note"] = f"regrouped from Opacus's default {entry['to']} (one channel per group)"
                    entry["to"] = _describe(new)
            entry["groups"] = new.num_groups
            entry["channels"] = new.num_channels
            entry["channels_per_group"] = new.num_channels // new.num_groups
            entry["affine"] = new.affine
        report.append(entry)
    for m in fixed.modules():  # Opacus's backward hooks cannot see through in-place activations (same function)
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    check_supported(fixed)
    return fixed, report


def make_dp_ready(handle: Any, small_groups: str = "regroup") -> list[dict[str, Any]]:
    """Replace the layers of ``handle.module`` that DP-SGD cannot train (:func:`prepare_module`) and return the
    model's whole conversion: what its weights already carried (``handle.metadata["norm_conversion"]``, from
    ``keiryo train --dp-ready`` or an earlier DP run) then what this call replaced. The result is stored back in
    ``handle.metadata``, so weights saved from the handle rebuild the same layers (:func:`read_weights_conversion`)."""
    handle.module, new = prepare_module(handle.module, small_groups)
    conversion = [*(handle.metadata.get("norm_conversion") or []), *new]
    if conversion:
        handle.metadata["norm_conversion"] = conversion
    return conversion


def conversion_metadata(handle: Any) -> dict[str, str]:
    """The weights-file metadata that rebuilds ``handle``'s converted layers on load (empty if none)."""
    conversion = handle.metadata.get("norm_conversion")
    return {NORM_CONVERSION_KEY: json.dumps(conversion)} if conversion else {}


def check_supported(module: nn.Module) -> None:
    """Raise :class:`UnsupportedOpError` naming the first layer DP-SGD cannot train, with the fix."""
    from opacus.validators import ModuleValidator

    for name, m in module.named_modules():
        if not any(p.requires_grad for p in m.parameters(recurse=False)):
            continue
        validator = ModuleValidator.VALIDATORS.get(type(m))
        errors = validator(m) if validator is not None else []
        if errors:
            raise UnsupportedOpError(
                f"layer {name!r} ({type(m).__name__}): Opacus cannot train it with DP-SGD ({first_line(errors[0], 160)}); "
                "fix: replace it with a DP-compatible layer (GroupNorm/LayerNorm for batch statistics) or freeze it",
                layer=name,
            )
        buffers = [b for b, _ in m.named_buffers(recurse=False)]
        if buffers:  # opacus GradSampleModule.validate's rule: state shared across samples is not private
            raise UnsupportedOpError(
                f"layer {name!r} ({type(m).__name__}): Opacus cannot compute per-sample gradients of a trainable layer "
                f"that keeps buffers ({', '.join(buffers)}: state shared across the batch); fix: move the buffers out "
                "of the layer, or freeze its parameters (requires_grad=False)",
                layer=name,
            )


def apply_conversion(module: nn.Module, conversion: list[dict[str, Any]]) -> nn.Module:
    """Rebuild the layers a DP run converted, so its weights load into a freshly built model.

    GroupNorm conversions need no Opacus; any other replacement (LSTM -> DPLSTM) runs ModuleValidator.fix.
    """
    if any(not str(e.get("to", "")).startswith("GroupNorm") for e in conversion):
        _opacus()
        from opacus.validators import ModuleValidator

        module = ModuleValidator.fix(module)
    for e in conversion:
        if "groups" in e:
            old = module.get_submodule(e["layer"])  # AttributeError for a layer the model does not have
            if not isinstance(old, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
                raise TypeError(f"layer {e['layer']!r} is {type(old).__name__}, not a normalization layer")
            _replace(module, e["layer"], nn.GroupNorm(int(e["groups"]), int(e["channels"]), affine=bool(e.get("affine", True))))
    return module


# ---- the DP-SGD run --------------------------------------------------------------------------------------


class _Rows:
    """A batch already gathered by :meth:`_MemoryItems.__getitems__` (its length is the batch size, as Opacus's
    empty-batch collate checks)."""

    def __init__(self, batch: tuple[dict[str, torch.Tensor], Any], n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n


class _MemoryItems(torch.utils.data.Dataset):
    """Rows of an in-memory split as ``(named inputs, target)`` items (keiryo's collate batches them); a sampled
    batch is gathered in one indexing operation (``__getitems__``), not row by row: per-row fetching and stacking
    was the largest part of a DP epoch on small models (9 of 25 ms on the digits MLP)."""

    def __init__(self, split: Any):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], Any]:
        y = self.split.targets
        return {k: v[i] for k, v in self.split.inputs.items()}, (None if y is None else y[i])

    def __getitems__(self, rows: list[int]) -> _Rows | list[Any]:
        if not rows:
            return []  # Opacus turns an empty Poisson batch into empty tensors of the first batch's structure
        idx = torch.as_tensor(rows, dtype=torch.long)
        y = self.split.targets
        inputs = {k: torch.as_tensor(v)[idx] for k, v in self.split.inputs.items()}
        return _Rows((inputs, None if y is None else torch.as_tensor(y)[idx]), len(rows))


def _collate(items: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    from keiryo.data.splits import collate

    return items.batch if isinstance(items, _Rows) else collate(items)


def train_dataset(split: Any) -> torch.utils.data.Dataset:
    """The train split as a map-style dataset of ``(named inputs, target)`` items (Opacus samples indices)."""
    from keiryo.data.splits import MemorySplit

    if isinstance(split, MemorySplit):
        return _MemoryItems(split)
    return torch.utils.data.Subset(split.dataset, [int(i) for i in split.indices])


class PerSampleLoss:
    """A loss as Opacus's ghost clipping takes it: with ``reduction = "none"`` one value per sample (the task's
    ``sample_losses`` where it has them, else its loss applied to each sample through ``torch.func.vmap``), else
    their mean."""

    def __init__(self, loss: Any, sample_losses: Any = None):
        self.loss, self.sample_losses = loss, sample_losses
        self.reduction = "mean"

    def __call__(self, outputs: list[torch.Tensor], targets: torch.Tensor | None) -> torch.Tensor:
        per = self.sample_losses(list(outputs), targets) if self.sample_losses is not None else None
        if per is not None:
            return per if self.reduction == "none" else per.mean()

        def one(outs: list[torch.Tensor], y: torch.Tensor | None) -> torch.Tensor:
            return self.loss([o.unsqueeze(0) for o in outs], None if y is None else y.unsqueeze(0))

        try:
            per = torch.func.vmap(one, in_dims=(0, None if targets is None else 0))(list(outputs), targets)
        except RuntimeError as e:
            raise PassError(
                f"dp grad_sample_mode ghost: the loss cannot be computed sample by sample with torch.func.vmap "
                f"({first_line(e, 160)}); use grad_sample_mode hooks"
            ) from e
        return per if self.reduction == "none" else per.mean()


@dataclass
class DPRun:
    """A model, optimizer and loader made private by Opacus; :meth:`record` is the guarantee spent so far."""

    module: nn.Module  # the GradSampleModule (its hooks sit on the layers of the wrapped module)
    optimizer: Any
    loader: Any
    engine: Any
    cfg: DPConfig
    delta: float
    noise_multiplier: float
    sample_rate: float
    dataset_size: int
    planned_steps: int
    epochs: int
    conversion: list[dict[str, Any]] = field(default_factory=list)
    criterion: Any = None  # ghost clipping: Opacus's DPLossFastGradientClipping (its loss.backward() runs both passes)
    hooks: list[Any] = field(default_factory=list)  # keiryo's own (grad_samplers.keep_group_norm_outputs)

    def close(self) -> None:
        """Remove Opacus's hooks and keiryo's, and per-sample gradients: the wrapped module is a plain module again."""
        from keiryo.privacy.grad_samplers import forget_outputs

        self.module.remove_hooks()  # type: ignore[operator]
        for h in self.hooks:
            h.remove()
        forget_outputs(self.module)
        for p in self.module.parameters():
            for attr in ("grad_sample", "summed_grad", "_forward_counter"):
                if hasattr(p, attr):
                    delattr(p, attr)

    def record(self) -> dict[str, Any]:
        opacus = _opacus()
        history = list(self.engine.accountant.history)
        steps = int(sum(h[2] for h in history))
        by = {a: round(epsilon_of(a, history, self.delta), 4) if steps else 0.0 for a in ACCOUNTANTS}
        return {
            "mechanism": "DP-SGD",
            "library": f"opacus {opacus.__version__}",
            "epsilon": by[self.cfg.accountant],
            "delta": self.delta,
            "accountant": self.cfg.accountant,
            "epsilon_by_accountant": by,
            "target_epsilon": self.cfg.target_epsilon,
            "noise_multiplier": round(self.noise_multiplier, 6),
            "sample_rate": round(self.sample_rate, 6),
            "steps": steps,
            "epochs": self.epochs,
            "max_grad_norm": self.cfg.max_grad_norm,
            "poisson_sampling": self.cfg.poisson_sampling,
            "grad_sample_mode": self.cfg.grad_sample_mode,
            "dataset_size": self.dataset_size,
            "unit": "one record of the train split",
            "model_selection": "last epoch (no early stopping or best-epoch choice on validation data)",
            "norm_conversion": self.conversion,
        }


PER_SAMPLE_BYTES = 4 << 30  # auto: per-sample gradients (hooks) only where they fit in this


def auto_mode(module: nn.Module, batch_size: int, own_loss: bool) -> str:
    """``grad_sample_mode: auto``. Per-sample gradients (``hooks``) for a convolutional model whose per-sample
    gradients (trainable parameters x batch x 4 bytes) fit in :data:`PER_SAMPLE_BYTES`: with keiryo's convolution
    and GroupNorm samplers they beat ghost clipping's second backward pass there (the demo's MobileNetV2 1.35x vs
    1.64x the non-DP epoch, its DP-ready 8x8 variant 1.91x vs 2.34x; bench/privacy.py --timing). Ghost clipping
    otherwise, where it applies (the task's own loss, batch 16+: the MLP 2.89x vs 4.26x), else ``hooks``."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    convolutional = any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())
    if convolutional and trainable * batch_size * 4 <= PER_SAMPLE_BYTES:
        return "hooks"
    return "ghost" if own_loss and batch_size >= 16 else "hooks"


def make_private(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    split: Any,
    batch_size: int,
    epochs: int,
    cfg: DPConfig,
    seed: int,
    conversion: list[dict[str, Any]] | None = None,
    loss: Any = None,
    sample_losses: Any = None,
) -> DPRun:
    """``PrivacyEngine.make_private`` with the noise for ``cfg.target_epsilon`` over ``epochs``; under ghost
    clipping ``loss(outputs, targets)`` is the (batch-mean) loss :class:`PerSampleLoss` applies sample by sample
    (``sample_losses(outputs, targets)``, where given and not None, gives them in one call)."""
    opacus = _opacus()
    ds = train_dataset(split)
    n = len(ds)  # type: ignore[arg-type]
    delta = resolve_delta(cfg, n)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, collate_fn=_collate)
    sample_rate = 1.0 / len(loader)  # what make_private uses: expected batch = N / batches per epoch
    steps = epochs * len(loader)
    sigma = noise_multiplier_for(cfg, sample_rate, steps, delta, f"{n} training records, batch {batch_size}, {epochs} epochs")
    if cfg.grad_sample_mode == "auto":  # the mode actually used is what the record shows
        cfg = cfg.model_copy(update={"grad_sample_mode": auto_mode(module, batch_size, loss is not None)})
    ghost = cfg.grad_sample_mode == "ghost"
    if ghost and (loss is None or batch_size < 16):
        why = (
            "only with the task's own loss (a distillation loss needs the teacher's outputs sample by sample)"
            if loss is None
            else f"batch {batch_size}: expected 16 or more (an empty Poisson batch cannot take a ghost-clipping step)"
        )
        raise ConfigError(f"dp grad_sample_mode ghost: {why}; use grad_sample_mode hooks")
    logging.getLogger("opacus").setLevel(logging.ERROR)
    # Opacus's hooks on a first layer whose input needs no gradient: torch warns on every backward, harmlessly
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
    module.train()
    with warnings.catch_warnings():  # "Secure RNG turned off": keiryo seeds its noise for reproducible runs
        warnings.simplefilter("ignore")
        engine = opacus.PrivacyEngine(accountant=cfg.accountant)
        made = engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=cfg.max_grad_norm,
            poisson_sampling=cfg.poisson_sampling,
            noise_generator=torch.Generator().manual_seed(seed),
            grad_sample_mode=cfg.grad_sample_mode,
            **({"criterion": PerSampleLoss(loss, sample_losses)} if ghost else {}),
        )
    gsm, dp_opt, dp_loader = (made[0], made[1], made[3]) if ghost else made
    if cfg.poisson_sampling:  # Opacus samples from its own generator: seed it for reproducible runs
        dp_loader.batch_sampler.generator = torch.Generator().manual_seed(seed + 1)
    from keiryo.privacy.grad_samplers import keep_group_norm_outputs

    hooks = keep_group_norm_outputs(module)  # GroupNorm's per-sample gradients from its output (grad_samplers.py)
    return DPRun(
        gsm,
        dp_opt,
        dp_loader,
        engine,
        cfg,
        delta,
        sigma,
        sample_rate,
        n,
        steps,
        epochs,
        conversion or [],
        made[2] if ghost else None,
        hooks,
    )


def privacy_of(results: dict[str, Any], cand: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The DP guarantee behind a candidate: the input model's (weights trained with ``keiryo train --dp`` or
    ``keiryo federate``) and each DP training step's (``info.privacy``), composed when there are several (they
    train on the same data: the guarantees add up, :func:`compose`); None when no DP training is recorded."""
    steps = ((cand or {}).get("report") or {}).get("steps") or []
    recs = [dict(r) for r in [(results.get("model") or {}).get("privacy")] if r]
    recs += [dict(rec) for step in steps if (rec := (step.get("info") or {}).get("privacy"))]
    if not recs:
        return None
    return recs[0] if len(recs) == 1 else compose(recs)


def compose(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """One guarantee for several DP trainings in sequence on the same data. DP-SGD runs compose exactly through
    the accountants (their histories concatenated, at the largest delta); any other mix (a federated model then a
    DP-SGD step) by basic composition: the epsilons and the deltas add up."""
    parts = [{k: r[k] for k in ("mechanism", "epsilon", "delta", "accountant", "steps", "rounds") if k in r} for r in recs]
    sgd = all(r.get("mechanism") == "DP-SGD" and {"noise_multiplier", "sample_rate", "steps"} <= set(r) for r in recs)
    if sgd:
        delta = max(float(r["delta"]) for r in recs)
        history = [(float(r["noise_multiplier"]), float(r["sample_rate"]), int(r["steps"])) for r in recs]
        by = {a: round(epsilon_of(a, history, delta), 4) for a in ACCOUNTANTS}
        accountant = recs[-1].get("accountant", "prv")
        return {
            "mechanism": "DP-SGD",
            "composition": f"{len(recs)} DP-SGD runs on the same data, composed by the accountants",
            "epsilon": by[accountant],
            "delta": delta,
            "accountant": accountant,
            "epsilon_by_accountant": by,
            "steps": sum(int(r["steps"]) for r in recs),
            "unit": recs[-1].get("unit", "one record of the train split"),
            "composed_of": parts,
        }
    return {
        "mechanism": "basic composition",
        "composition": f"{len(recs)} DP trainings in sequence: epsilons and deltas add up",
        "epsilon": round(sum(float(r["epsilon"]) for r in recs), 4),
        "delta": sum(float(r["delta"]) for r in recs),
        "accountant": "basic",
        "epsilon_by_accountant": {"basic": round(sum(float(r["epsilon"]) for r in recs), 4)},
        "unit": "; ".join(dict.fromkeys(str(r.get("unit", "")) for r in recs)),
        "composed_of": parts,
    }


def _weights_metadata(path: str) -> dict[str, str]:
    if not str(path).endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # an unreadable file is reported by load_weights with its own message
        return {}


def read_weights_privacy(path: str) -> dict[str, Any] | None:
    """The DP record stored in a .safetensors file's metadata by ``keiryo train --dp``, or the one of a federated
    model trained with DP (``keiryo federate``: its ``keiryo.federated`` summary); None if absent."""
    meta = _weights_metadata(path)
    raw = meta.get(PRIVACY_METADATA_KEY)
    if raw:
        return dict(json.loads(raw))
    from keiryo.privacy.federated import FEDERATED_METADATA_KEY, model_privacy

    fed = meta.get(FEDERATED_METADATA_KEY)
    return model_privacy(json.loads(fed)) if fed else None


def read_weights_conversion(path: str, privacy: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The layers replaced so DP-SGD could train the weights in ``path`` (BatchNorm -> GroupNorm): stored by
    ``keiryo train --dp-ready`` (:data:`NORM_CONVERSION_KEY`), or inside the DP record ``privacy`` of ``--dp``."""
    raw = _weights_metadata(path).get(NORM_CONVERSION_KEY)
    try:
        conversion = json.loads(raw) if raw else (privacy or {}).get("norm_conversion") or []
    except ValueError as e:
        raise InputFileError(f"{path}: its {NORM_CONVERSION_KEY} metadata is not JSON ({e})") from e
    if not isinstance(conversion, list) or not all(isinstance(e, dict) and isinstance(e.get("layer"), str) for e in conversion):
        raise InputFileError(f"{path}: its layer conversion is not a list of {{layer, from, to, ...}} records")
    return conversion


def summary_line(rec: dict[str, Any]) -> str:
    """One line for people: what the model promises (DP-SGD, a federated model's client-level DP, or their
    composition)."""
    if "composed_of" in rec:
        parts = ", ".join(f"{p['mechanism']} {p['epsilon']:g}" for p in rec["composed_of"])
        other = {k: v for k, v in rec.get("epsilon_by_accountant", {}).items() if k != rec.get("accountant")}
        beside = "".join(f", {k.upper()} {v:g}" for k, v in other.items())
        return (
            f"({rec['epsilon']:g}, {rec['delta']:g})-DP ({rec['composition']}; {rec['accountant'].upper()} accountant"
            f"{beside}): {parts}"
        )
    if "rounds" in rec and "clients" in rec:
        basic = rec.get("epsilon_by_accountant", {}).get("basic")
        beside = f", basic composition {basic:g}" if basic is not None else ""
        return (
            f"({rec['epsilon']:g}, {rec['delta']:g})-DP ({rec['mechanism']}, {rec['accountant'].upper()} accountant{beside}): "
            f"clipping norm {rec['clipping_norm']:g}, noise multiplier {rec['noise_multiplier']:.3g}, {rec['rounds']} "
            f"rounds, {rec['clients']} clients ({rec.get('clients_per_round', rec['clients'])} per round)"
        )
    other = {k: v for k, v in rec.get("epsilon_by_accountant", {}).items() if k != rec.get("accountant")}
    beside = "".join(f", {k.upper()} {v:g}" for k, v in other.items())
    return (
        f"({rec['epsilon']:g}, {rec['delta']:g})-DP ({rec.get('mechanism', 'DP-SGD')}, {rec['accountant'].upper()} "
        f"accountant{beside}): noise {rec['noise_multiplier']:.3g}, sampling rate {rec['sample_rate']:.3g}, "
        f"{rec['steps']} steps, clipping norm {rec['max_grad_norm']:g}"
    )
