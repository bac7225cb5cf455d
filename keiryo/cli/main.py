"""keiryo's CLI. Every command parses options, builds configs, calls the library and
maps :class:`~keiryo.errors.KeiryoError` to a one-line message and an exit code
(``--debug`` shows the traceback)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from keiryo.cli.app import app_command
from keiryo.cli.privacy import CalibDataOpt, calibration, federate, privacy_app
from keiryo.errors import ConfigError, KeiryoError

app = typer.Typer(
    name="keiryo",
    help="Make a trained PyTorch model lightweight for the machine it must run on: compress, measure on the "
    "target runtime, export, ship.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}
app.add_typer(privacy_app, name="privacy")  # keys for encrypted packages (keiryo/cli/privacy.py)
app.command("federate")(federate)  # Flower, in its own environment (keiryo/cli/privacy.py)
app.command("app")(app_command)  # the real-time page (keiryo/cli/app.py)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="zoo:NAME, path/to/file.py:factory or package.module:factory")]
ModelOpts = Annotated[
    Optional[list[str]], typer.Option("--model-opt", help="model option key=value (repeatable), e.g. width=0.5")
]
WeightsOpt = Annotated[Optional[Path], typer.Option("--weights", "-w", help=".safetensors or a state_dict .pt (weights_only)")]
DataOpt = Annotated[
    str,
    typer.Option(
        "--data", "-d", help="digits | font-digits | sensors | tokens | file.npz | image folder | file.csv | module:function"
    ),
]
DataOpts = Annotated[Optional[list[str]], typer.Option("--data-opt", help="data option key=value (repeatable), e.g. size=16")]
SeedOpt = Annotated[int, typer.Option("--seed", help="seed for the split and training")]
ThreadsOpt = Annotated[int, typer.Option("--threads", min=1, help="intra-op threads for measurement")]
TaskOpt = Annotated[
    str,
    typer.Option(
        "--task",
        "-t",
        help="auto | classification | multilabel | regression | embedding | sequence-classification | "
        "token-classification | outputs | module:Class",
    ),
]
TaskOpts = Annotated[Optional[list[str]], typer.Option("--task-opt", help="task option key=value, e.g. output=logits")]
DeviceOpt = Annotated[str, typer.Option("--device", help="where training runs: auto | cpu | cuda | mps")]
EvalSizeOpt = Annotated[int, typer.Option("--eval-size", min=1, help="test samples held in memory and evaluated")]
CalibSizeOpt = Annotated[int, typer.Option("--calib-size", min=1, help="calibration samples drawn from train")]
MaxDropOpt = Annotated[
    Optional[float],
    typer.Option(
        "--max-drop",
        "--max-accuracy-drop",
        help="budget: how much worse than the baseline, in the task's unit (accuracy points; MAE increase in %; cosine points)",
    ),
]


def _console() -> Any:
    from keiryo._console import stdout_console

    return stdout_console()


def _err(msg: str) -> None:
    from rich.text import Text

    from keiryo._console import stderr_console

    stderr_console().print(Text.assemble(("error:", "bold red"), " ", msg), highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        from keiryo import __version__

        typer.echo(f"keiryo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks on errors")] = False,
    version: Annotated[
        bool, typer.Option("--version", help="print the version and exit", is_eager=True, callback=_version)
    ] = False,
) -> None:
    _state["debug"] = debug


def _load(
    model: str,
    model_opt: list[str] | None,
    weights: Path | None,
    data: str,
    data_opt: list[str] | None,
    seed: int,
    task: str = "auto",
    task_opt: list[str] | None = None,
    eval_size: int | None = None,
    calib_size: int | None = None,
) -> tuple[Any, Any, Any]:
    """Data, then the task (named or inferred from the data), then the model, checked against both before any work."""
    from keiryo.data import DataSpec, load_data
    from keiryo.data.splits import parse_options
    from keiryo.model import ModelSpec, load_model
    from keiryo.tasks import get_task, infer_task

    sizes = {k: v for k, v in (("eval_size", eval_size), ("calib_size", calib_size)) if v is not None}
    dspec = DataSpec.parse({"source": data, "options": parse_options(data_opt), "seed": seed, **sizes}, where="--data")
    splits = load_data(dspec)
    t = get_task(infer_task(splits) if task == "auto" else task, **parse_options(task_opt))
    mspec = ModelSpec(source=model, options=parse_options(model_opt), weights=str(weights) if weights else None)
    handle = load_model(mspec, splits, seed=seed, output_name=t.default_output)
    t.bind(handle.output_names)
    t.check(handle.io.outputs, splits)
    return handle, splits, t


def _bench_opts(
    threads: int,
    iterations: int,
    parity_tolerance: float | None,
    no_parity_check: bool,
    seed: int,
    batch_size: int = 1,
    device: str = "cpu",
) -> Any:
    from keiryo.benchmark import BenchConfig
    from keiryo.export import ParityConfig
    from keiryo.pipeline import RunOptions

    parity: dict[str, Any] = {"enforce": not no_parity_check}
    if parity_tolerance is not None:
        parity["max_abs_diff"] = parity_tolerance
    return RunOptions(
        bench=BenchConfig(threads=threads, iterations=iterations, latency_batch=batch_size),
        parity=ParityConfig.parse(parity, where="parity options"),
        seed=seed,
        device=device,
    )


def _constraint(metric: str, op: str, bound: float) -> Any:
    from keiryo.search import Constraint

    return Constraint.parse({"metric": metric, "op": op, "bound": bound}, where=f"budget {metric}")


def _budget(max_drop: float | None, task: str, task_opt: list[str] | None) -> list[Any]:
    """``--max-drop`` as a constraint on the task's drop metric (accuracy_drop for classification)."""
    if max_drop is None:
        return []
    from keiryo.data.splits import parse_options
    from keiryo.tasks import get_task

    name = "classification" if task == "auto" else task  # auto: resolved against the data in _retarget_budget
    return [_constraint(get_task(name, **parse_options(task_opt)).drop_name, "<=", max_drop)]


def _retarget_budget(cons: list[Any], task: Any, max_drop: float | None) -> list[Any]:
    """An ``auto`` task is known only once the data is read: put the ``--max-drop`` constraint (the first one,
    see _budget) on its drop metric; constraints the user named with --constraint stay as given."""
    if max_drop is None:
        return cons
    return [cons[0].model_copy(update={"metric": task.drop_name}), *cons[1:]]


def _print_results(results: dict[str, Any], out: Path) -> None:
    from keiryo.report import results_table

    con = _console()
    con.print(results_table(results))
    best = results.get("best")
    con.print(f"results: {out / 'results.json'}" + (f"   best: {best}" if best else ""), highlight=False)


@app.command()
def train(
    model: ModelOpt,
    data: DataOpt = "digits",
    out: Annotated[Path, typer.Option("--out", "-o", help="where to write the trained weights (.safetensors)")] = Path(
        "model.safetensors"
    ),
    model_opt: ModelOpts = None,
    weights: WeightsOpt = None,
    data_opt: DataOpts = None,
    task: TaskOpt = "auto",
    task_opt: TaskOpts = None,
    epochs: Annotated[int, typer.Option(min=1)] = 20,
    lr: Annotated[float, typer.Option(min=0)] = 3e-3,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    patience: Annotated[int, typer.Option(min=1, help="early stopping: epochs without a better validation metric")] = 5,
    device: DeviceOpt = "cpu",
    seed: SeedOpt = 0,
    dp: Annotated[bool, typer.Option("--dp", help="differentially private training (Opacus DP-SGD; keiryo[privacy])")] = False,
    target_epsilon: Annotated[Optional[float], typer.Option("--target-epsilon", help="--dp: the run's epsilon budget")] = None,
    delta: Annotated[Optional[float], typer.Option("--delta", help="--dp: delta (default 1/N rounded down to 10^-k)")] = None,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="--dp: per-sample clipping norm")] = 1.0,
    accountant: Annotated[str, typer.Option("--accountant", help="--dp: prv | rdp (the other is reported beside)")] = "prv",
    grad_sample_mode: Annotated[
        str,
        typer.Option(
            "--grad-sample-mode",
            help="--dp: auto (hooks for a CNN whose per-sample gradients fit in 4 GiB, else ghost where it applies, else "
            "hooks) | hooks (per-sample gradients, Opacus's default) | ghost (ghost clipping: the same clipping and "
            "guarantee without materializing per-sample gradients)",
        ),
    ] = "auto",
    dp_ready: Annotated[
        bool,
        typer.Option(
            "--dp-ready",
            help="replace the layers DP-SGD cannot train (BatchNorm -> GroupNorm, as --dp does) and train without DP: "
            "pretraining on public data for a later --dp fine-tune (the weights file records the conversion)",
        ),
    ] = False,
) -> None:
    """Train a model on the data's train split with the task's loss (AdamW, cosine schedule, early stopping on val).

    With --dp: DP-SGD through Opacus (Poisson sampling, every epoch run, the last kept); the guarantee is
    stored in the weights file and travels into results.json and the package manifest. With --dp-ready (public
    data, no DP): the model DP-SGD will fine-tune, pretrained: `keiryo train --weights W --dp` takes it on."""
    from keiryo.model import save_weights
    from keiryo.train import TrainConfig
    from keiryo.train import train as run_train

    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: weights are written as .safetensors; give a path ending in .safetensors")
    from keiryo.cli.privacy import dp_config

    dp_cfg = dp_config(dp, target_epsilon, delta, max_grad_norm, accountant, grad_sample_mode)
    handle, splits, t = _load(model, model_opt, weights, data, data_opt, seed, task, task_opt)
    if dp_ready and dp_cfg is None:
        from collections import Counter

        from keiryo.privacy.dp import make_dp_ready

        conv = make_dp_ready(handle)
        kinds = Counter(f"{e['from'].split('(')[0]} -> {e['to'].split('(')[0]}" for e in conv)
        first = f" (first: {conv[0]['layer']} {conv[0]['from']} -> {conv[0]['to']})" if conv else ""
        what = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "none needed"
        _console().print(f"dp-ready: {len(conv)} layer(s) replaced for DP-SGD: {what}{first}", highlight=False)
    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, patience=patience, seed=seed, device=device, dp=dp_cfg)  # type: ignore[arg-type]
    res = run_train(handle, splits, t, cfg)
    test = res.test_metrics.get(t.primary)
    meta = {
        "model": handle.spec.model_dump_json(exclude={"weights"}),
        "data": json.dumps(splits.summary()),
        "task": t.name,
        f"test_{t.primary}": f"{test:.6f}",
        f"val_{t.primary}": f"{res.best_val:.6f}",
    }
    from keiryo.privacy.dp import conversion_metadata

    meta.update(conversion_metadata(handle))
    if res.privacy is not None:
        from keiryo.privacy.dp import PRIVACY_METADATA_KEY, summary_line

        meta[PRIVACY_METADATA_KEY] = json.dumps(res.privacy)
        _console().print(f"privacy: {summary_line(res.privacy)}", highlight=False)
    save_weights(handle.module, out, meta)
    _console().print(
        f"trained {handle.spec.source} ({t.name}) on {res.device}: best val {t.primary} {res.best_val:.4g} at epoch "
        f"{res.best_epoch}/{res.epochs_run}, test {test:.4g}, {res.seconds:.0f}s -> {out}",
        highlight=False,
    )


@app.command()
def compress(
    model: ModelOpt,
    recipe: Annotated[
        list[str], typer.Option("--recipe", "-r", help="built-in name (int8, fp16, ...) or a YAML/JSON recipe; repeatable")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory (results.json, candidates/)")],
    data: DataOpt = "digits",
    model_opt: ModelOpts = None,
    weights: WeightsOpt = None,
    data_opt: DataOpts = None,
    target: Annotated[
        str,
        typer.Option(
            help="onnx | tflite | web (onnxruntime-web in headless Chromium): the format candidates ship in and are "
            "measured on (recipes that name none)"
        ),
    ] = "onnx",
    max_drop: MaxDropOpt = None,
    constraint: Annotated[Optional[list[str]], typer.Option(help="extra constraint 'metric<=bound' (repeatable)")] = None,
    task: TaskOpt = "auto",
    task_opt: TaskOpts = None,
    device: DeviceOpt = "cpu",
    eval_size: EvalSizeOpt = 2000,
    calib_size: CalibSizeOpt = 256,
    calib_data: CalibDataOpt = "train",
    threads: ThreadsOpt = 1,
    iterations: Annotated[int, typer.Option(min=5, help="timed runs for the latency percentiles")] = 200,
    batch_size: Annotated[int, typer.Option(min=1, help="batch size the latency is measured at")] = 1,
    parity_tolerance: Annotated[Optional[float], typer.Option(help="max abs logit difference allowed for the export")] = None,
    no_parity_check: Annotated[
        bool, typer.Option("--no-parity-check", help="record a failed export parity check instead of stopping")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --out")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate and print the recipes, do nothing")] = False,
    require_met: Annotated[
        bool, typer.Option(help="exit non-zero (listing the closest candidates) when no candidate meets the budget")
    ] = False,
    seed: SeedOpt = 0,
) -> None:
    """Run recipes on a model and measure every result on the target runtime; writes DIR/results.json.

    A recipe that fails is recorded with its reason and the others are kept; the exit code is then 4."""
    import yaml

    from keiryo.budget import parse_constraint
    from keiryo.pipeline import compress as run_compress
    from keiryo.pipeline import load_recipe

    recipes = [load_recipe(r, target=target) for r in recipe]
    if max_drop is not None:  # an explicit budget: int8 escalates to it (int8-auto), int8-auto steps take it
        from keiryo.pipeline.recipe import with_budget

        for i, r in enumerate(recipes):
            recipes[i], note = with_budget(r, max_drop)
            if note:
                _console().print(f"note: {note}", highlight=False)
    drop_budget = 1.0 if max_drop is None else max_drop  # the default budget does not change recipes
    constraints = _budget(drop_budget, task, task_opt) + [parse_constraint(c) for c in constraint or []]
    opts = _bench_opts(threads, iterations, parity_tolerance, no_parity_check, seed, batch_size, device)
    if dry_run:
        typer.echo(yaml.safe_dump([r.to_dict() for r in recipes], sort_keys=False).rstrip())
        return
    handle, splits, t = _load(model, model_opt, weights, data, data_opt, seed, task, task_opt, eval_size, calib_size)
    splits = calibration(splits, handle, calib_data, calib_size, seed)
    constraints = _retarget_budget(constraints, t, drop_budget)
    results = run_compress(handle, splits, recipes, out, constraints=constraints, opts=opts, overwrite=overwrite, task=t)
    _print_results(results, out)
    if require_met and results.get("best") is None:
        from keiryo.budget import violation
        from keiryo.errors import ConstraintNotMetError

        ok = [c for c in results["candidates"] if c.get("status") == "ok"]
        ok.sort(key=lambda c: sum(max(0.0, violation(k, c["metrics"])) for k in constraints))
        closest = ", ".join(f"{c['name']} ({'; '.join(c['constraints_violated'])})" for c in ok[:3])
        budget = ", ".join(map(str, constraints))
        raise ConstraintNotMetError(f"no candidate meets the budget ({budget}); closest: {closest or 'none'} (see {out})")
    if results.get("failed"):
        n = len(results["candidates"])
        _err(f"{results['failed']} of {n} candidates failed (see 'failed_step' and 'error' in {out / 'results.json'})")
        raise typer.Exit(4)


@app.command()
def optimize(
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="search directory (study.db, trials/, results.json, report.html)")],
    data: DataOpt = "digits",
    model_opt: ModelOpts = None,
    weights: WeightsOpt = None,
    data_opt: DataOpts = None,
    target: Annotated[
        str,
        typer.Option(
            help="onnx (onnxruntime) | tflite (LiteRT interpreter) | web (onnxruntime-web in headless Chromium): "
            "the format candidates ship in and are measured on"
        ),
    ] = "onnx",
    max_drop: MaxDropOpt = 1.0,
    task: TaskOpt = "auto",
    task_opt: TaskOpts = None,
    device: DeviceOpt = "cpu",
    eval_size: EvalSizeOpt = 2000,
    calib_size: CalibSizeOpt = 256,
    calib_data: CalibDataOpt = "train",
    max_latency_ms: Annotated[Optional[float], typer.Option(help="budget: p95 latency (ms) at --batch-size (default 1)")] = None,
    max_size_mb: Annotated[Optional[float], typer.Option(help="budget: model file size (MB)")] = None,
    min_fidelity: Annotated[Optional[float], typer.Option(help="budget: agreement with the baseline's predictions (0-1)")] = None,
    constraint: Annotated[Optional[list[str]], typer.Option(help="extra constraint 'metric<=bound' (repeatable)")] = None,
    template: Annotated[Optional[list[str]], typer.Option(help="search only these templates (repeatable)")] = None,
    trials: Annotated[int, typer.Option(min=1, help="trials in all (a resumed search counts the finished ones)")] = 20,
    timeout: Annotated[Optional[float], typer.Option(min=1, help="stop starting trials after this many seconds")] = None,
    stop_when_met: Annotated[bool, typer.Option(help="stop as soon as a candidate meets the budget")] = False,
    require_met: Annotated[bool, typer.Option(help="exit non-zero when no candidate meets the budget")] = False,
    resume: Annotated[bool, typer.Option(help="continue the search in --out; completed trials are not recomputed")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --out")] = False,
    executor: Annotated[str, typer.Option(help="local or ray")] = "local",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address HOST:PORT (executor ray)")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="parallel trials (executor ray)")] = None,
    sampler: Annotated[str, typer.Option(help="nsga2 (multi-objective) or tpe (constrained)")] = "nsga2",
    threads: ThreadsOpt = 1,
    iterations: Annotated[int, typer.Option(min=5, help="timed runs per candidate for the latency percentiles")] = 200,
    batch_size: Annotated[int, typer.Option(min=1, help="batch size the latency budget refers to")] = 1,
    seed: SeedOpt = 0,
) -> None:
    """Search the compression recipe that meets a budget, every candidate measured on the target runtime."""
    from keiryo.budget import parse_constraint
    from keiryo.search.optimize import OptimizeConfig
    from keiryo.search.optimize import optimize as run_optimize

    cons = _budget(max_drop, task, task_opt)
    for metric, bound, op in (
        ("latency_p95_ms", max_latency_ms, "<="),
        ("size_mb", max_size_mb, "<="),
        ("fidelity", min_fidelity, ">="),
    ):
        if bound is not None:
            cons.append(_constraint(metric, op, bound))
    cons += [parse_constraint(c) for c in constraint or []]
    cfg = OptimizeConfig.parse(
        {
            "target": target,
            "constraints": [c.model_dump() for c in cons],
            "trials": trials,
            "timeout_s": timeout,
            "stop_when_met": stop_when_met,
            "executor": executor,
            "address": address,
            "workers": workers,
            "sampler": sampler,
            "seed": seed,
            **({"templates": template} if template else {}),
        },
        where="optimize options",
    )
    opts = _bench_opts(threads, iterations, None, False, seed, batch_size, device)
    handle, splits, t = _load(model, model_opt, weights, data, data_opt, seed, task, task_opt, eval_size, calib_size)
    splits = calibration(splits, handle, calib_data, calib_size, seed)
    cfg = cfg.model_copy(update={"constraints": _retarget_budget(list(cfg.constraints), t, max_drop)})
    results = run_optimize(handle, splits, out, cfg, opts, resume=resume, overwrite=overwrite, require_met=require_met, task=t)
    _print_results(results, out)
    _console().print(f"report: {out / 'report.html'}", highlight=False)


@app.command()
def export(
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="output file (.onnx, .tflite) or Core ML package (.mlpackage)")],
    format: Annotated[str, typer.Option("--format", "-f", help="onnx | tflite | coreml | web")] = "onnx",
    variant: Annotated[
        str,
        typer.Option(
            "--variant",
            help="built-in recipe for the format (fp32, fp16, int8, int8-dynamic; tflite: int8-tensorwise; coreml: "
            "palettize4, cluster16-palettize, sparse80) or a YAML/JSON recipe",
        ),
    ] = "fp32",
    data: DataOpt = "digits",
    model_opt: ModelOpts = None,
    weights: WeightsOpt = None,
    data_opt: DataOpts = None,
    task: TaskOpt = "auto",
    task_opt: TaskOpts = None,
    parity_tolerance: Annotated[Optional[float], typer.Option(help="max abs output difference allowed")] = None,
    no_parity_check: Annotated[
        bool, typer.Option("--no-parity-check", help="report a parity failure instead of stopping")
    ] = False,
    seed: SeedOpt = 0,
) -> None:
    """Export a model to a deployment format, check the export against PyTorch, then apply the variant's format steps.

    The fp32 export is compared with PyTorch on test samples on its own runtime (ONNX on onnxruntime,
    TFLite on the LiteRT interpreter); the final file's accuracy and top-1 agreement are measured there
    too. Core ML packages are validated structurally where Core ML cannot run (Linux).
    """
    from keiryo.pipeline import load_recipe
    from keiryo.pipeline.runner import export_variant

    recipe = load_recipe(variant, target=format)
    if recipe.target != format:
        raise ConfigError(f"--variant {variant}: the recipe targets {recipe.target}, not --format {format}")
    opts = _bench_opts(1, 5, parity_tolerance, no_parity_check, seed)
    handle, splits, t = _load(model, model_opt, weights, data, data_opt, seed, task, task_opt)
    rep = export_variant(recipe, handle, splits, out, opts, task=t)
    art = rep["artifact"]
    from keiryo.evaluate import size_of

    par = rep["parity"]
    if "skipped" in par:
        check = f"[yellow]structure validated[/] (prediction parity skipped: {par['skipped']})"
    else:
        status = "[green]parity ok[/]" if par["passed"] else "[red]PARITY FAILED[/]"
        agree = "" if par.get("top1_agreement") is None else f", top-1 agreement {par['top1_agreement']:.2%}"
        check = (
            f"{status}: max abs diff {par['max_abs_diff']:.2e}{agree} on {par['samples']} test samples, "
            f"{len(par.get('outputs') or [1])} output(s)"
        )
    con = _console()
    con.print(f"{out}: {size_of(art.path).size_bytes / 1e6:.2f} MB ({format}, {recipe.name}); export {check}", highlight=False)
    fmt_steps = [s["type"] for s in rep["steps"] if s.get("stage") not in ("torch", "export")]
    if rep.get("metrics") is not None:
        m, tm = rep["metrics"], rep["torch_metrics"]
        val, ref = m.get(t.primary), tm.get(t.primary)
        con.print(
            f"  {' + '.join(fmt_steps) or 'fp32'} on {art.runtime}: test {t.primary} {val:.4g} (torch {ref:.4g}), "
            f"fidelity to torch {m['fidelity']:.4g}, {m['samples']} samples",
            highlight=False,
        )
    if "compressed_weight_ops" in art.info:
        con.print(
            f"  weights {art.info['weights_bytes'] / 1e6:.2f} MB; "
            f"compressed weight ops: {art.info['compressed_weight_ops'] or 'none'}; op types: {', '.join(art.info['op_types'])}",
            highlight=False,
        )


@app.command()
def keygen(
    out: Annotated[Path, typer.Option("--out", "-o", help="private key file (PEM); the public key goes to NAME.pub.pem")] = Path(
        "keiryo-key.pem"
    ),
    overwrite: Annotated[bool, typer.Option(help="replace existing key files")] = False,
) -> None:
    """Create an EC P-256 key pair for signing packages (offline; keep the private key secret)."""
    from keiryo.packages import keygen as make_keys

    priv, pub = make_keys(out, overwrite=overwrite)
    _console().print(f"private key: {priv} (mode 600)\npublic key:  {pub}", highlight=False)


@app.command("package")
def package_cmd(
    result_dir: Annotated[Path, typer.Argument(help="a compress/optimize/demo output directory (results.json)")],
    name: Annotated[str, typer.Option("--name", help="package name (lowercase, digits, . _ -)")],
    version: Annotated[str, typer.Option("--version", help="package version, e.g. 1.0.0")],
    key: Annotated[Path, typer.Option("--key", help="private key (PEM) from `keiryo keygen`")],
    out: Annotated[Path, typer.Option("--out", "-o", help="package directory to write (a .tar.gz is written beside it)")],
    candidate: Annotated[Optional[str], typer.Option("--candidate", help="candidate name (default: the best)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing package")] = False,
    encrypt_to: Annotated[
        Optional[Path],
        typer.Option("--encrypt-to", help="encrypt the model file (AES-256-GCM) for this public key (PEM) or symmetric key file"),
    ] = None,
) -> None:
    """Package a candidate as a signed directory: model file, keiryo.json manifest (with golden vectors), model.sig."""
    from keiryo.packages import package

    pkg = package(
        result_dir,
        name=name,
        version=version,
        private_key=key,
        out=out,
        candidate=candidate,
        overwrite=overwrite,
        encrypt_to=encrypt_to,
    )
    _console().print(f"package: {pkg}  ({pkg.name}.tar.gz beside it), signed with {key.name}", highlight=False)
    from keiryo.cli.privacy import print_guarantees

    print_guarantees(_console(), pkg)


@app.command("verify")
def verify_cmd(
    pkg: Annotated[Path, typer.Argument(help="package directory")],
    public_key: Annotated[Path, typer.Option("--public-key", help="the signer's public key (PEM)")],
    no_golden: Annotated[bool, typer.Option("--no-golden", help="check the signature only, do not run the model")] = False,
    decryption_key: Annotated[
        Optional[Path], typer.Option("--decryption-key", help="an encrypted model's key (default $KEIRYO_DECRYPTION_KEY)")
    ] = None,
) -> None:
    """Verify every file of a package against its signature, and that its golden vectors reproduce."""
    from keiryo.cli.privacy import print_guarantees
    from keiryo.packages import verify

    rep = verify(pkg, public_key, golden=not no_golden, decryption_key=decryption_key)
    m = rep["manifest"]
    g = rep["golden_max_abs_diff"]
    gold = f"; golden vectors reproduce (max abs diff {g:.2e})" if g is not None else ""
    _console().print(
        f"[green]verified[/] {m['name']} {m['version']} ({m['format']}): {len(rep['files'])} files match the signature{gold}",
        highlight=False,
    )
    print_guarantees(_console(), m)


from keiryo.cli.registry import registry_app  # noqa: E402  (the registry's commands live in their own module)

app.add_typer(registry_app, name="registry")
from keiryo.cli.agent import agent_app  # noqa: E402

app.add_typer(agent_app, name="agent")


@app.command()
def serve(
    model: Annotated[list[str], typer.Option("--model", "-m", help="NAME or NAME@ALIAS in the registry; repeatable")],
    public_key: Annotated[Path, typer.Option("--public-key", help="the signer's public key; every package is verified")],
    registry: Annotated[
        Optional[str],
        typer.Option("--registry", help="registry directory or http(s):// URL (default $KEIRYO_REGISTRY or ~/.keiryo/registry)"),
    ] = None,
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    grpc_port: Annotated[
        Optional[int], typer.Option("--grpc-port", min=0, max=65535, help="also serve the OIP over gRPC on this port")
    ] = None,
    grpc_max_message_mb: Annotated[
        float, typer.Option("--grpc-max-message-mb", min=0.001, help="largest gRPC message (RESOURCE_EXHAUSTED beyond)")
    ] = 64.0,
    api_key: Annotated[
        Optional[list[str]], typer.Option("--api-key", envvar="KEIRYO_API_KEYS", help="bearer key for inference (repeatable)")
    ] = None,
    admin_key: Annotated[
        Optional[list[str]], typer.Option("--admin-key", envvar="KEIRYO_ADMIN_KEYS", help="bearer key for /v2/repository")
    ] = None,
    allow_anonymous: Annotated[bool, typer.Option("--allow-anonymous", help="serve inference without a key")] = False,
    threads: Annotated[int, typer.Option(min=1, help="intra-op threads per model session")] = 1,
    max_batch_size: Annotated[int, typer.Option(min=1, help="dynamic batching: rows per run (1 = off)")] = 32,
    max_queue_delay_ms: Annotated[float, typer.Option(min=0, help="dynamic batching: wait for more requests")] = 2.0,
    inline_below_ms: Annotated[
        float,
        typer.Option(
            min=0,
            help="a lone request to an idle model whose runs take under this runs on the event loop (0: never)",
        ),
    ] = 2.0,
    max_queue: Annotated[int, typer.Option(min=1, help="waiting requests per model before 503")] = 256,
    body_limit_mb: Annotated[float, typer.Option(min=0.001, help="largest request body")] = 16.0,
    parse_in_flight_mb: Annotated[
        float,
        typer.Option(
            "--parse-in-flight-mb",
            min=0.001,
            help="JSON being parsed off the event loop at once, MB (503 past it; >= body limit)",
        ),
    ] = 32.0,
    drift_window_rows: Annotated[
        int, typer.Option("--drift-window-rows", min=10, help="recent rows compared with the package's drift reference")
    ] = 1000,
    drift_psi_threshold: Annotated[
        float,
        typer.Option("--drift-psi-threshold", min=0.0001, help="log a drift event when the predictions' PSI goes over this"),
    ] = 0.2,
    timeout_s: Annotated[float, typer.Option(min=0.001, help="per-request timeout")] = 10.0,
    poll_s: Annotated[float, typer.Option(min=0, help="refresh the registry's signed metadata every N s (0 = never)")] = 5.0,
    trusted_root: Annotated[
        Optional[Path],
        typer.Option(
            "--trusted-root", envvar="KEIRYO_TRUSTED_ROOT", help="TUF root to trust (default: a local registry's tuf/1.root.json)"
        ),
    ] = None,
    tuf_cache: Annotated[Optional[Path], typer.Option("--tuf-cache", help="where trusted metadata is kept between runs")] = None,
    decryption_key: Annotated[
        Optional[Path], typer.Option("--decryption-key", help="key for encrypted packages (default $KEIRYO_DECRYPTION_KEY)")
    ] = None,
    ssl_certfile: Annotated[Optional[Path], typer.Option("--ssl-certfile", help="TLS: the server's certificate (PEM)")] = None,
    ssl_keyfile: Annotated[Optional[Path], typer.Option("--ssl-keyfile", help="TLS: its private key (PEM)")] = None,
    ssl_ca_certs: Annotated[
        Optional[Path], typer.Option("--ssl-ca-certs", help="mTLS: clients must present a certificate this CA signed")
    ] = None,
    public_metrics: Annotated[bool, typer.Option("--public-metrics", help="serve /metrics without an API key")] = False,
    limit_concurrency: Annotated[int, typer.Option(min=1, help="connections and tasks before new ones get 503")] = 1000,
    page: Annotated[bool, typer.Option("--app", help="also serve the real-time page at /app (see `keiryo app`)")] = False,
) -> None:
    """Serve registry models over the Open Inference Protocol v2 (KServe V2) REST API.

    The registry (a directory or an http(s) URL of `keiryo registry serve`) is read as a TUF client:
    only what its current signed metadata names is served; expired or rolled-back metadata is refused
    and the last good model keeps serving."""
    from keiryo.serve import ServeSettings, run_server

    settings = ServeSettings(
        models=model,
        public_key=str(public_key),
        api_keys=[k for ks in (api_key or []) for k in ks.split(",") if k],
        admin_keys=[k for ks in (admin_key or []) for k in ks.split(",") if k],
        allow_anonymous=allow_anonymous,
        threads=threads,
        max_batch_size=max_batch_size,
        max_queue_delay_ms=max_queue_delay_ms,
        inline_below_ms=inline_below_ms,
        max_queue=max_queue,
        body_limit_bytes=int(body_limit_mb * 2**20),
        parse_bytes_in_flight=int(parse_in_flight_mb * 2**20),
        drift_window_rows=drift_window_rows,
        drift_psi_threshold=drift_psi_threshold,
        request_timeout_s=timeout_s,
        poll_s=poll_s or None,
        trusted_root=str(trusted_root) if trusted_root else None,
        tuf_cache=str(tuf_cache) if tuf_cache else None,
        decryption_key=str(decryption_key) if decryption_key else None,
        public_metrics=public_metrics,
        grpc_port=grpc_port,
        grpc_host=host,
        grpc_max_message_bytes=int(grpc_max_message_mb * 2**20),
    )
    settings.check()
    tls = None
    if ssl_certfile or ssl_keyfile or ssl_ca_certs:
        if not (ssl_certfile and ssl_keyfile):
            raise ConfigError("TLS needs both --ssl-certfile and --ssl-keyfile")
        from keiryo.serve.app import TLSSettings

        ca = str(ssl_ca_certs) if ssl_ca_certs else None
        tls = TLSSettings(certfile=str(ssl_certfile), keyfile=str(ssl_keyfile), ca_certs=ca)
        settings = settings.model_copy(update={"grpc_tls": tls})  # the gRPC port speaks TLS as well
    build = None
    if page:
        from keiryo.app import assets_missing, create_page_app

        if assets_missing():
            raise ConfigError(f"--app: {assets_missing()}")

        def build(source: Any, s: Any) -> Any:
            asgi, sessions = create_page_app(source, s, poll_s=poll_s or 2.0)
            if sessions is not None:
                scheme = "https" if tls else "http"
                link = f"{scheme}://{host}:{port}/app/login?code={sessions.login_code}"
                _console().print(f"page: {link}", highlight=False, soft_wrap=True)
            return asgi

    run_server(registry, settings, host, port, tls=tls, limit_concurrency=limit_concurrency, build=build)


@app.command()
def deploy(
    kind: Annotated[str, typer.Argument(help="docker | k8s | agent | knative")],
    pkg: Annotated[Path, typer.Argument(help="package directory from `keiryo package`")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory")],
    public_key: Annotated[Optional[Path], typer.Option("--public-key", help="the signer's key: verifies the package")] = None,
    image: Annotated[Optional[str], typer.Option(help="k8s, knative: container image (default keiryo-NAME:VERSION)")] = None,
    replicas: Annotated[int, typer.Option(min=1, help="k8s: minimum replicas")] = 2,
    max_replicas: Annotated[int, typer.Option(min=1, help="k8s: HPA maximum replicas; knative: max-scale")] = 10,
    cpu_target: Annotated[int, typer.Option(min=1, max=100, help="k8s: HPA CPU utilisation target, %")] = 70,
    cpu: Annotated[str, typer.Option(help="k8s, knative: CPU request = limit")] = "1",
    memory: Annotated[str, typer.Option(help="k8s, knative: memory request = limit")] = "1Gi",
    concurrency: Annotated[
        int, typer.Option(min=1, max=10000, help="knative: in-flight requests per pod (the autoscaler's target and the hard cap)")
    ] = 32,
    tls_secret: Annotated[
        Optional[str], typer.Option("--tls-secret", help="k8s: a kubernetes.io/tls Secret: the server speaks HTTPS")
    ] = None,
    client_ca_secret: Annotated[
        Optional[str], typer.Option("--client-ca-secret", help="k8s: a Secret with ca.crt: clients need its certificates")
    ] = None,
    ingress_namespaces: Annotated[
        Optional[str],
        typer.Option(
            "--ingress-namespaces",
            help="k8s: NetworkPolicy peers, namespace labels k=v[,k=v] (default: the same namespace)",
        ),
    ] = None,
    ingress_pods: Annotated[
        Optional[str], typer.Option("--ingress-pods", help="k8s: NetworkPolicy peers, pod labels k=v[,k=v] (default: any pod)")
    ] = None,
    source: Annotated[Optional[str], typer.Option(help="agent: the registry URL (or directory) the device pulls from")] = None,
    trusted_root: Annotated[Optional[Path], typer.Option("--trusted-root", help="agent: the registry's tuf/1.root.json")] = None,
    alias: Annotated[str, typer.Option(help="agent: the alias the device follows")] = "production",
    keiryo_wheel: Annotated[
        Optional[Path],
        typer.Option("--keiryo-wheel", help="docker: keiryo's wheel for the image (default: built from the source tree)"),
    ] = None,
) -> None:
    """Write deploy assets: a slim CPU-only Docker build context, Kubernetes Deployment + Service + HPA + NetworkPolicy,
    a scale-to-zero Knative Service, or a systemd unit for `keiryo agent` on a device."""
    from keiryo.serve.deploy import parse_labels, write_agent, write_docker, write_k8s, write_knative

    if kind == "agent":
        if public_key is None or trusted_root is None or source is None:
            raise ConfigError("deploy agent: pass --public-key, --trusted-root and --source")
        path = write_agent(pkg, public_key, trusted_root, out, source=source, alias=alias)
        _console().print(f"systemd unit and keys for the device: {path} (install steps at the top of the unit)", highlight=False)
    elif kind == "docker":
        if public_key is None:
            raise ConfigError("deploy docker: pass --public-key (the image verifies its package at every start)")
        path = write_docker(pkg, public_key, out, wheel=keiryo_wheel)
        _console().print(f"docker build context: {path} (docker build -t IMAGE {path})", highlight=False)
    elif kind == "k8s":
        if public_key is None:
            raise ConfigError("deploy k8s: pass --public-key (the package is verified before anything is written)")
        if max_replicas < replicas:
            raise ConfigError(f"--max-replicas {max_replicas} is below --replicas {replicas}")
        path = write_k8s(
            pkg,
            out,
            public_key,
            image=image,
            replicas=replicas,
            max_replicas=max_replicas,
            cpu_target=cpu_target,
            cpu=cpu,
            memory=memory,
            tls_secret=tls_secret,
            client_ca_secret=client_ca_secret,
            ingress_namespaces=parse_labels(ingress_namespaces, "--ingress-namespaces"),
            ingress_pods=parse_labels(ingress_pods, "--ingress-pods"),
        )
        _console().print(f"kubernetes manifests: {path} (kubectl apply -f {path})", highlight=False)
    elif kind == "knative":
        if public_key is None:
            raise ConfigError("deploy knative: pass --public-key (the package is verified before anything is written)")
        path = write_knative(
            pkg, out, public_key, image=image, max_scale=max_replicas, concurrency=concurrency, cpu=cpu, memory=memory
        )
        _console().print(f"knative service: {path} (kubectl apply -f {path})", highlight=False)
    else:
        raise ConfigError(f"deploy {kind!r}: expected docker, k8s, knative or agent")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory")] = Path("keiryo-demo"),
    epochs: Annotated[int, typer.Option(min=1, help="training epochs")] = 12,
    threads: ThreadsOpt = 1,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --out")] = True,
    seed: SeedOpt = 0,
) -> None:
    """Train the zoo MobileNetV2 on digits (16x16) and measure fp32 ONNX, int8 static and fp16 on onnxruntime."""
    from keiryo.demo import run_demo

    results = run_demo(out, epochs=epochs, threads=threads, overwrite=overwrite, seed=seed)
    _print_results(results, out)


@app.command()
def doctor(
    model: ModelOpt,
    data: Annotated[
        Optional[str], typer.Option("--data", "-d", help="data to take the inputs from (or give --input instead)")
    ] = None,
    input: Annotated[
        Optional[list[str]],
        typer.Option(
            "--input", help="an input without data: NAME:DTYPE[d1,d2,...] per sample, e.g. input_ids:int64[128] (repeatable)"
        ),
    ] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="outputs to build a zoo model with (with --input)")] = None,
    model_opt: ModelOpts = None,
    weights: WeightsOpt = None,
    data_opt: DataOpts = None,
    batch_size: Annotated[int, typer.Option(min=1, help="the batch size you will serve at")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    quant: Annotated[
        bool, typer.Option("--quant", help="int8 sensitivity: the drop when only one layer is int8, range outliers, the fix")
    ] = False,
    seed: SeedOpt = 0,
) -> None:
    """Pre-flight check: what each technique and export target can handle, and what predicts 'compressed but not faster'."""
    from rich.markup import escape
    from rich.table import Table

    from keiryo.doctor import diagnose

    if input:
        if data is not None:
            raise ConfigError("doctor: give --data or --input, not both")
        from keiryo.data.splits import parse_options
        from keiryo.model import ModelSpec, load_model
        from keiryo.model.io import parse_input_spec

        mspec = ModelSpec(source=model, options=parse_options(model_opt), weights=str(weights) if weights else None)
        handle = load_model(mspec, [parse_input_spec(s) for s in input], num_classes, seed=seed)
    else:
        handle, splits, task_obj = _load(model, model_opt, weights, data or "digits", data_opt, seed)
    rep = diagnose(handle, batch_size)
    if quant:
        if input:
            raise ConfigError("doctor --quant: needs --data (calibration and evaluation samples), not --input")
        from keiryo.doctor import quant_sensitivity

        rep["quant"] = quant_sensitivity(handle, splits, task_obj)
    if as_json:
        typer.echo(json.dumps(rep, indent=2))
        return
    con = _console()
    con.print(f"{rep['model']}: {rep['params']:,} params, {rep['macs']:,} MACs", highlight=False)
    t = Table("technique", "layers it can handle", "not handled (why)", title="techniques")
    for name, cov in rep["techniques"].items():
        if name.startswith("_"):
            continue
        layers = cov["layers"]
        by_reason: dict[str, list[str]] = {}
        for layer, why in cov["not"].items():
            by_reason.setdefault(why, []).append(layer)
        nots = [f"{why}: {len(ls)} ({', '.join(ls[:2])}{', ...' if len(ls) > 2 else ''})" for why, ls in by_reason.items()]
        t.add_row(
            name, f"{len(layers)}: " + ", ".join(layers[:4]) + (" ..." if len(layers) > 4 else ""), escape("; ".join(nots) or "-")
        )
    con.print(t)
    e = Table("target", "exports", "op types / error", title="export targets")
    for target, r in rep["exports"].items():
        detail = ", ".join(f"{k} x{v}" for k, v in sorted(r["op_types"].items())) if r["ok"] else r["error"]
        e.add_row(target, "[green]yes[/]" if r["ok"] else "[red]no[/]", escape(detail))
    con.print(e)
    for w in rep["warnings"]:
        con.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)
    if "quant" in rep:
        q = rep["quant"]
        qt = Table("layer int8 alone", f"{q['metric']}", title=f"int8 sensitivity (all int8: {q['drop_all_int8']})")
        for layer, d in list(q["drop_one_layer_int8"].items())[:10]:
            qt.add_row(escape(layer), f"{d:g}")
        con.print(qt)
        for name, r in list(q["range_outliers"].items())[:10]:
            con.print(
                f"range outlier: {escape(name)} observed {r['observed']} vs least-error {r['least_error']}", highlight=False
            )
        for f in q["predicted_fix"]:
            con.print(f"fix: {escape(f)}", highlight=False)


@app.command()
def zoo() -> None:
    """List the built-in models and their options."""
    from rich.table import Table

    from keiryo.model.zoo import ZOO

    t = Table("name", "inputs", "options", "what")
    for name in ZOO:
        e = ZOO.get(name)
        opts = ", ".join(f"{k}={f.default}" for k, f in e.options.model_fields.items())
        t.add_row(f"zoo:{name}", " or ".join(f"rank {r}" for r in e.input_ranks), opts, e.summary)
    _console().print(t)


@app.command()
def recipes(
    target: Annotated[
        str, typer.Option(help="show the built-ins as they run on this target: onnx | tflite | coreml | web")
    ] = "onnx",
) -> None:
    """List the built-in recipes (for a target) and the registered passes a recipe step can use."""
    from rich.table import Table

    from keiryo.passes import all_passes
    from keiryo.pipeline.recipe import builtin_names, load_recipe

    t = Table("recipe", "export", "steps", "what", title=f"built-in recipes, target {target}")
    for name in builtin_names(target):
        try:
            r = load_recipe(name, target=target)
        except ConfigError as e:
            t.add_row(name, "", "[dim](not available)[/]", str(e).split(": ", 1)[-1])
            continue
        opts = ", ".join(f"{k}={v}" for k, v in r.export.items())
        t.add_row(name, opts, " -> ".join(s.type for s in r.steps) or "(export only)", r.description)
    p = Table("step type", "stage", "params", "what", title="passes")
    for spec in all_passes():
        defaults = spec.config().model_dump()
        params = ", ".join(f"{k}={v}" for k, v in defaults.items())
        p.add_row(spec.name, spec.stage, params, spec.summary)
    _console().print(t)
    _console().print(p)


@app.command()
def machine() -> None:
    """Print the CPU (with int8 dot-product support) and library versions measurements are tied to."""
    from keiryo.machine import machine_info

    typer.echo(json.dumps(machine_info(), indent=2))


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning KeiryoError into one line on stderr and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    _state["debug"] = "--debug" in args
    try:
        rv = app(args=args, standalone_mode=False)
        if isinstance(rv, int) and rv:  # typer.Exit(code) inside a command comes back as the return value here
            return rv
    except KeiryoError as e:
        if _state["debug"]:
            raise
        _err(str(e))
        return e.exit_code
    except typer.Exit as e:
        return int(e.exit_code or 0)
    except typer.Abort:
        _err("aborted")
        return 130
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except typer.exceptions.TyperException as e:  # usage errors: bad option, missing argument
        show = getattr(e, "show", None)
        if callable(show):
            show()
        else:
            _err(e.format_message())
        return e.exit_code
    except Exception as e:
        if _state["debug"]:
            raise
        _err(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)")
        return 1
    return 0
