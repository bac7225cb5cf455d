"""DP-SGD through Opacus: delta default, reachable epsilon, BatchNorm conversion, unsupported layers, the
guarantee a run records, DP weights reloaded, DP distillation, and DP QAT."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

pytest.importorskip("opacus")

from keiryo.errors import ConfigError, PassError, UnsupportedOpError  # noqa: E402
from keiryo.model import ModelSpec, load_model, save_weights  # noqa: E402
from keiryo.passes import PassContext, apply  # noqa: E402
from keiryo.passes._state import FinetuneConfig  # noqa: E402
from keiryo.passes.distill import DistillConfig  # noqa: E402
from keiryo.passes.qat import QatConfig  # noqa: E402
from keiryo.privacy.dp import (  # noqa: E402
    PRIVACY_METADATA_KEY,
    DPConfig,
    default_delta,
    epsilon_of,
    noise_multiplier_for,
    prepare_module,
    resolve_delta,
)
from keiryo.tasks import get_task  # noqa: E402
from keiryo.testing import TinyCNN  # noqa: E402
from keiryo.train import TrainConfig, train  # noqa: E402


def test_default_delta_is_below_one_over_n_and_a_larger_delta_is_refused():
    assert default_delta(1437) == 1e-4 and default_delta(1000) == 1e-4 and default_delta(999) == 1e-3
    assert resolve_delta(DPConfig(target_epsilon=8), 1167) == 1e-4
    with pytest.raises(ConfigError, match=r"--delta 0.01: must be below 1/N = 0.00855 for 117 training records"):
        resolve_delta(DPConfig(target_epsilon=8, delta=0.01), 117)


def test_an_unreachable_epsilon_names_the_smallest_reachable_one():
    cfg = DPConfig(target_epsilon=0.01, max_noise_multiplier=10)
    with pytest.raises(ConfigError, match="smallest reachable epsilon is") as e:
        noise_multiplier_for(cfg, 0.05, 200, 1e-4, "test data")
    floor = float(re.search(r"smallest reachable epsilon is ([0-9.e-]+)", str(e.value)).group(1))
    assert floor == pytest.approx(epsilon_of("prv", [(10.0, 0.05, 200)], 1e-4), rel=1e-2)
    # just above the floor is reachable, with at most the largest noise allowed
    sigma = noise_multiplier_for(DPConfig(target_epsilon=floor * 1.2), 0.05, 200, 1e-4, "test data")
    assert 1.0 < sigma <= 10.0
    assert epsilon_of("prv", [(sigma, 0.05, 200)], 1e-4) <= floor * 1.2


def test_batchnorm_becomes_groupnorm_with_two_or_more_channels_per_group_reported_layer_by_layer():
    fixed, report = prepare_module(TinyCNN(width=8))
    assert [(r["layer"], r["from"], r["to"], r["channels_per_group"]) for r in report] == [
        ("features.1", "BatchNorm2d(8)", "GroupNorm(4, 8)", 2),
        ("features.4", "BatchNorm2d(16)", "GroupNorm(8, 16)", 2),
    ]
    assert "one channel per group" in report[0]["note"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fixed.modules())
    with pytest.raises(PassError, match=r"layer 'features.1': BatchNorm2d\(8\) becomes GroupNorm\(8, 8\), one channel per group"):
        prepare_module(TinyCNN(width=8), "error")
    _, warned = prepare_module(TinyCNN(width=8), "warn")
    assert warned[0]["to"] == "GroupNorm(8, 8)" and "wrecks small models" in warned[0]["warning"]
    # 64 channels: Opacus's gcd(32, 64) = 32 groups of 2 is already fine and kept
    _, wide = prepare_module(nn.Sequential(nn.Conv2d(1, 64, 3), nn.BatchNorm2d(64)))
    assert wide[0]["to"] == "GroupNorm(32, 64)" and "note" not in wide[0]


class _Running(nn.Module):
    """A trainable layer that keeps a running statistic: state shared across samples."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.register_buffer("running", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_a_layer_opacus_cannot_train_is_named_with_the_fix():
    model = nn.Sequential(nn.Linear(4, 4), _Running(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedOpError, match=r"layer '1' \(_Running\).*buffers \(running.*fix: move the buffers") as e:
        prepare_module(model)
    assert e.value.layer == "1"


def conv_bn_head(input_shape=(1, 8, 8), num_classes=10):
    """A conv layer with BatchNorm and a linear head: learns digits under DP noise in a few epochs."""
    c, hgt, wid = input_shape
    return nn.Sequential(
        nn.Conv2d(c, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(8 * hgt * wid, num_classes),
    )


SPEC = ModelSpec(source=f"{__file__}:conv_bn_head")


@pytest.fixture(scope="module")
def dp_trained(digits):
    h = load_model(SPEC, digits, output_name="logits")
    task = get_task("classification").bind(h.output_names)
    cfg = TrainConfig(epochs=4, lr=2e-2, batch_size=256, seed=0, dp=DPConfig(target_epsilon=8))
    return h, train(h, digits, task, cfg, progress=False)


def test_dp_training_records_the_guarantee_opacus_accounts(dp_trained, digits):
    h, res = dp_trained
    p = res.privacy
    n = len(digits.train)
    batches = -(-n // 256)
    assert p["dataset_size"] == n and p["delta"] == default_delta(n) and p["accountant"] == "prv"
    assert p["sample_rate"] == pytest.approx(1 / batches, rel=1e-4) and p["epochs"] == 4 == res.epochs_run
    assert p["steps"] == 4 * batches and p["max_grad_norm"] == 1.0 and p["poisson_sampling"] is True
    # the budget is spent (not exceeded), and the number is what Opacus's accountants give for that history
    assert 7.5 <= p["epsilon"] <= 8.0
    history = [(p["noise_multiplier"], p["sample_rate"], p["steps"])]
    assert p["epsilon"] == pytest.approx(epsilon_of("prv", history, p["delta"]), rel=1e-3)
    assert p["epsilon_by_accountant"]["rdp"] == pytest.approx(epsilon_of("rdp", history, p["delta"]), rel=1e-3)
    assert p["epsilon_by_accountant"]["rdp"] > p["epsilon"]  # PRV is the tighter accountant here
    assert [(c["layer"], c["to"]) for c in p["norm_conversion"]] == [("1", "GroupNorm(4, 8)")]
    # the model learned under noise (chance is 0.1), and no Opacus hook or per-sample gradient is left on it
    assert res.test_metrics["accuracy"] > 0.7
    assert all(not m._forward_hooks and not m._backward_hooks for m in h.module.modules())
    assert not any(hasattr(q, "grad_sample") for q in h.module.parameters())
    json.dumps(p)  # JSON as it is written into weights, results.json and the manifest


def test_dp_weights_reload_into_the_original_factory_with_their_guarantee(dp_trained, digits, tmp_path):
    h, res = dp_trained
    path = save_weights(h.module, tmp_path / "dp.safetensors", {PRIVACY_METADATA_KEY: json.dumps(res.privacy)})
    again = load_model(SPEC.model_copy(update={"weights": str(path)}), digits, output_name="logits")
    assert again.metadata["privacy"] == res.privacy
    assert isinstance(again.module[1], nn.GroupNorm) and again.module[1].num_groups == 4
    x = digits.test.inputs["image"][:8]
    with torch.no_grad():
        assert torch.equal(again.module.eval()(x), h.module.eval()(x))


def test_dp_distillation_records_the_guarantee_in_the_steps_info(tiny_trained, digits):
    ctx = PassContext(data=digits, teacher=tiny_trained, task=get_task("classification").bind(tiny_trained.output_names))
    dp = DPConfig(target_epsilon=4, accountant="rdp")  # RDP: a faster noise search than PRV (the default, tested above)
    res = apply(tiny_trained, DistillConfig(train=FinetuneConfig(epochs=1, lr=1e-2, batch_size=128, dp=dp)), ctx)
    rec = res.info["privacy"]
    assert rec["target_epsilon"] == 4 and rec["accountant"] == "rdp" and rec["epsilon"] <= 4 < rec["epsilon"] * 1.1
    assert "privacy_step" not in res.model.metadata


@pytest.fixture(scope="module")
def mlp_trained(digits):
    """A model without BatchNorm (DP would turn it into a fresh GroupNorm), trained without DP (~2 s)."""
    h = load_model("zoo:mlp", digits, options={"hidden": [32]}, output_name="logits", seed=0)
    train(h, digits, get_task("classification").bind(h.output_names), TrainConfig(epochs=20, lr=1e-2), progress=False)
    return h


@pytest.mark.parametrize("calib", ["train", "synthetic"])
def test_qat_with_dp_trains_on_the_int8_grid_with_ranges_from_the_calibration_split(mlp_trained, digits, calib):
    """QAT under DP-SGD: ranges fixed from the calibration split before training (the private train split is
    recorded as not covered; synthetic data is), the guarantee recorded, the layers plain again afterwards."""
    from keiryo.data.splits import with_calibration

    data = with_calibration(digits, calib, 128)
    ctx = PassContext(data=data, task=get_task("classification").bind(mlp_trained.output_names))
    dp = DPConfig(target_epsilon=8, accountant="rdp")
    before = {k: v.clone() for k, v in mlp_trained.module.state_dict().items()}
    res = apply(mlp_trained, QatConfig(train=FinetuneConfig(epochs=2, lr=2e-3, batch_size=128, dp=dp)), ctx)
    rec = res.info["privacy"]
    assert rec["mechanism"] == "DP-SGD" and rec["epsilon"] <= 8 and rec["steps"] > 0
    assert res.info["activation_ranges_from"]["source"] == calib
    assert ("privacy_note" in res.info) == (calib == "train")
    lo, hi = next(iter(res.info["activation_ranges"].values()))
    assert lo <= 0 < hi
    after = res.model.module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)  # it trained
    assert all(type(m).__name__ not in ("PrivateFakeQuant", "FakeQuant") for m in res.model.module.modules())
    assert all(isinstance(m.weight, nn.Parameter) for m in res.model.module.modules() if isinstance(m, nn.Linear | nn.Conv2d))
    with torch.no_grad():  # still a working classifier (chance is 0.1)
        pred = res.model.module.eval()(digits.test.inputs["image"]).argmax(1)
    acc = float((pred == torch.as_tensor(digits.test.targets)).float().mean())
    assert acc > 0.8, acc


def test_per_sample_gradients_through_private_fake_quant_layers_are_exact(digits):
    """Opacus's per-sample gradients of a QAT model under DP (PrivateFakeQuant: fixed input ranges, the layer's
    weight owned by the wrapper) equal torch.func's vmap(grad) of each sample's loss, straight through the int8
    rounding of weights and inputs."""
    import copy

    from opacus import GradSampleModule
    from torch.func import functional_call, grad, vmap

    from keiryo.passes.qat import PrivateFakeQuant

    h = load_model("zoo:mlp", digits, options={"hidden": [16]}, output_name="logits", seed=1)
    cfg = QatConfig()
    for n in [n for n, m in h.module.named_modules() if isinstance(m, nn.Linear)]:
        parent, _, leaf = n.rpartition(".")
        layer = h.module.get_submodule(n)
        setattr(h.module.get_submodule(parent) if parent else h.module, leaf, PrivateFakeQuant(layer, cfg, -0.5, 4.0))
    for m in h.module.modules():  # as prepare_module does: Opacus's hooks cannot see through in-place activations
        if getattr(m, "inplace", False):
            m.inplace = False
    ref_module = copy.deepcopy(h.module)
    x, y = digits.train.inputs["image"][:12], torch.as_tensor(digits.train.targets[:12])
    gsm = GradSampleModule(h.module, loss_reduction="sum")
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    params = {k: v.detach() for k, v in ref_module.named_parameters()}

    def one(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(ref_module, p, (xi[None],)), yi[None], reduction="sum")

    want = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    for name, p in h.module.named_parameters():
        assert p.grad_sample.shape == (12, *p.shape)
        assert torch.allclose(p.grad_sample, want[name], atol=1e-6), name
    assert float(want[next(iter(want))].abs().max()) > 0
    gsm._close()


@pytest.mark.parametrize(
    "layer, shape",
    [
        (lambda: nn.Conv2d(12, 12, 3, 2, 1, groups=12), (5, 12, 9, 9)),  # depthwise, strided
        (lambda: nn.Conv2d(6, 12, (3, 2), stride=(3, 2), padding=(1, 0), groups=3, dilation=(1, 2)), (4, 6, 11, 10)),
        (lambda: nn.Conv2d(6, 6, 3, padding="same", groups=6, dilation=2, bias=False), (3, 6, 8, 8)),
        (lambda: nn.Conv1d(4, 4, 4, padding="same", groups=2, dilation=3), (3, 4, 13)),  # asymmetric "same"
        (lambda: nn.Conv1d(4, 8, 3, stride=2, padding=1, groups=4), (3, 4, 12)),
        (lambda: nn.Conv2d(4, 6, 3, padding=1), (3, 4, 5, 5)),  # one group: Opacus's own sampler
        (lambda: nn.Conv2d(8, 16, 1), (4, 8, 3, 5)),  # 1x1: a matmul per sample
        (lambda: nn.Conv1d(8, 6, 1, bias=False), (4, 8, 7)),
        (lambda: nn.Conv2d(8, 16, 1, stride=2), (4, 8, 5, 5)),  # strided 1x1: Opacus's own sampler
    ],
)
def test_per_sample_gradients_of_grouped_convolutions_are_exact(layer, shape):
    """keiryo's sampler for grouped convolutions (registered with Opacus when DP starts) gives each sample's
    gradient as torch.func's vmap(grad) does, through Opacus's GradSampleModule, for depthwise, grouped,
    strided, dilated and "same"-padded layers."""
    import copy

    from opacus import GradSampleModule
    from torch.func import functional_call, grad, vmap

    from keiryo.privacy import grad_samplers
    from keiryo.privacy.dp import _opacus

    _opacus()
    torch.manual_seed(0)
    net = nn.Sequential(layer(), nn.Tanh())
    ref = copy.deepcopy(net)  # Opacus's hooks stay off the reference
    params = {k: v.detach() for k, v in ref.named_parameters()}
    x = torch.randn(shape)
    gsm = GradSampleModule(net, loss_reduction="sum")
    (gsm(x) ** 2).sum().backward()

    def one(p: dict, xi: torch.Tensor) -> torch.Tensor:
        return (functional_call(ref, p, (xi[None],)) ** 2).sum()

    want = vmap(grad(one), in_dims=(None, 0))(params, x)
    for name, p in net.named_parameters():
        assert p.grad_sample.shape == (shape[0], *p.shape)
        assert torch.allclose(p.grad_sample, want[name], atol=1e-5), name
    gsm._close()
    assert GradSampleModule.GRAD_SAMPLERS[nn.Conv2d] is grad_samplers.grouped_conv_grad_sample


@pytest.mark.parametrize("beta_scale", [0.5, 1e4])  # the second: |gamma| tiny against |beta|, Opacus's way is taken
def test_per_sample_gradients_of_group_norm_from_its_kept_output_are_exact(beta_scale):
    """GroupNorm's per-sample gradients from the output its forward hook kept ((sum y g - beta sum g) / gamma) equal
    torch.func's vmap(grad), for a layer used twice in one forward pass too; without the hook, or where gamma is
    small against beta, Opacus's own sampler answers; the hooks leave nothing behind."""
    import copy

    from opacus import GradSampleModule
    from torch.func import functional_call, grad, vmap

    from keiryo.privacy import grad_samplers
    from keiryo.privacy.dp import _opacus

    _opacus()
    torch.manual_seed(0)
    norm = nn.GroupNorm(3, 12)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_(0, beta_scale)
    net = nn.Sequential(nn.Conv2d(2, 12, 3, padding=1), norm, nn.Tanh(), nn.Conv2d(12, 12, 1), norm, nn.Tanh())
    ref = copy.deepcopy(net)
    params = {k: v.detach() for k, v in ref.named_parameters()}
    x = torch.randn(5, 2, 6, 6)
    gsm = GradSampleModule(net, loss_reduction="sum")
    hooks = grad_samplers.keep_group_norm_outputs(net)
    calls = []
    opacus_way = grad_samplers._opacus_group_norm

    def counted(*a):
        calls.append(1)
        return opacus_way(*a)

    grad_samplers._opacus_group_norm = counted
    try:
        (gsm(x) ** 2).sum().backward()
    finally:
        grad_samplers._opacus_group_norm = opacus_way

    def one(p: dict, xi: torch.Tensor) -> torch.Tensor:
        return (functional_call(ref, p, (xi[None],)) ** 2).sum()

    want = vmap(grad(one), in_dims=(None, 0))(params, x)
    for name, p in net.named_parameters():
        assert torch.allclose(p.grad_sample, want[name], rtol=1e-4, atol=1e-4), name
    # used twice: the kept output matches the last call only, so the first call's gradient came from Opacus's way
    assert len(calls) == (2 if beta_scale > 1 else 1)
    for h in hooks:
        h.remove()
    grad_samplers.forget_outputs(net)
    gsm._close()
    assert not hasattr(norm, "_keiryo_output") and not norm._forward_hooks


@pytest.mark.parametrize(
    "layer, shape, ghost",
    [
        (lambda: nn.Conv2d(64, 96, 1), (6, 64, 2, 2), True),  # wide, few positions: the ghost norm is cheaper
        (lambda: nn.Conv2d(128, 128, 3, padding=1, groups=2), (5, 128, 2, 2), True),
        (lambda: nn.Conv1d(40, 40, 3, padding="same", groups=2), (4, 40, 3), True),
        (lambda: nn.Conv2d(12, 12, 3, 2, 1, groups=12), (5, 12, 9, 9), False),  # depthwise: the gradient itself
        (lambda: nn.Conv2d(3, 8, 3, padding=1, bias=False), (4, 3, 8, 8), False),
    ],
)
def test_per_sample_gradient_norms_of_convolutions_for_ghost_clipping_are_exact(layer, shape, ghost):
    """keiryo's norm sampler for convolutions (ghost clipping) gives each sample's gradient norm, by the ghost
    norm or by the gradient itself, whichever costs less for the layer, equal to the norm of torch.func's
    per-sample gradient."""
    import copy

    from torch.func import functional_call, grad, vmap

    from keiryo.privacy import grad_samplers
    from keiryo.privacy.dp import _opacus

    _opacus()
    torch.manual_seed(0)
    conv = layer()
    ref = copy.deepcopy(conv)
    x = torch.randn(shape)
    y = conv(x)
    backprops = torch.randn_like(y)
    norms = grad_samplers.conv_norm_sample(conv, [x], backprops)
    positions = y[0, 0].numel()
    explicit, ghost_cost = grad_samplers._sizes(conv, positions)
    assert (ghost_cost < explicit) == ghost

    def one(p: dict, xi: torch.Tensor, bi: torch.Tensor) -> torch.Tensor:
        return (functional_call(ref, p, (xi[None],)) * bi[None]).sum()

    want = vmap(grad(one), in_dims=(None, 0, 0))({k: v.detach() for k, v in ref.named_parameters()}, x, backprops)
    for name, p in conv.named_parameters():
        assert torch.allclose(norms[p], want[name].flatten(1).norm(dim=1), rtol=1e-4), name


def test_auto_mode_takes_per_sample_gradients_for_a_cnn_that_fits_and_ghost_clipping_otherwise(monkeypatch):
    from keiryo.privacy import dp

    cnn = nn.Sequential(nn.Conv2d(1, 8, 3), nn.GroupNorm(4, 8), nn.Flatten(), nn.Linear(8 * 36, 10))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    assert dp.auto_mode(cnn, 256, own_loss=True) == "hooks"  # measured faster on the CNNs (bench/privacy.py --timing)
    assert dp.auto_mode(mlp, 256, own_loss=True) == "ghost"  # and ghost clipping on the MLP
    assert dp.auto_mode(mlp, 8, own_loss=True) == "hooks"  # ghost clipping needs a batch of 16+
    assert dp.auto_mode(mlp, 256, own_loss=False) == "hooks"  # and the task's own loss
    params = sum(p.numel() for p in cnn.parameters())
    monkeypatch.setattr(dp, "PER_SAMPLE_BYTES", params * 256 * 4 - 1)  # per-sample gradients would not fit
    assert dp.auto_mode(cnn, 256, own_loss=True) == "ghost"
    for p in cnn.parameters():  # only trainable parameters count
        p.requires_grad_(False)
    cnn[3].weight.requires_grad_(True)
    assert dp.auto_mode(cnn, 256, own_loss=True) == "hooks"


def test_dp_config_round_trips_inside_the_training_configs():
    cfg = TrainConfig(dp=DPConfig(target_epsilon=3, delta=1e-5))
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="unknown field 'epsilon'"):
        DPConfig.parse({"target_epsilon": 1, "epsilon": 2})


def test_sample_losses_are_the_per_sample_form_of_each_tasks_loss():
    """Ghost clipping takes each sample's loss from the task in one call (``sample_losses``) instead of vmap: for
    every task that has the form, their mean is the task's loss and each equals the loss of that sample alone."""
    from keiryo.privacy.dp import PerSampleLoss

    g = torch.Generator().manual_seed(0)
    cases = {
        "classification": (torch.randn(6, 4, generator=g), torch.randint(0, 4, (6,), generator=g)),
        "regression": (torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)),
        "multilabel": (torch.randn(6, 5, generator=g), (torch.rand(6, 5, generator=g) > 0.5).float()),
    }
    for name, (out, y) in cases.items():
        task = get_task(name).bind(["out"])
        per = task.sample_losses([out], y)
        assert per is not None and per.shape == (6,), name
        assert torch.allclose(per.mean(), task.loss([out], y), atol=1e-6), name
        one = torch.stack([task.loss([out[i : i + 1]], y[i : i + 1]) for i in range(6)])
        assert torch.allclose(per, one, atol=1e-6), name
        fast, vmapped = PerSampleLoss(task.loss, task.sample_losses), PerSampleLoss(task.loss)
        fast.reduction = vmapped.reduction = "none"
        assert torch.allclose(fast([out], y), vmapped([out], y), atol=1e-6), name
    assert get_task("token-classification").bind(["out"]).sample_losses([torch.zeros(2, 3, 4)], None) is None


def test_ghost_clipping_takes_the_same_steps_as_per_sample_gradients(digits):
    """grad_sample_mode ghost (Opacus's ghost clipping: per-sample norms without materializing per-sample gradients)
    clips and noises like the default hooks mode: the same seeds give the same Poisson batches and noise, so two
    epochs end at the same weights, and the record names the mode. A distillation loss is refused with ghost."""
    task = None
    got = {}
    for mode in ("hooks", "ghost"):
        h = load_model(SPEC, digits, output_name="logits", seed=3)
        task = get_task("classification").bind(h.output_names)
        dp = DPConfig(target_epsilon=8, accountant="rdp", grad_sample_mode=mode)
        res = train(h, digits, task, TrainConfig(epochs=2, lr=2e-2, batch_size=256, seed=0, dp=dp), progress=False)
        assert res.privacy["grad_sample_mode"] == mode
        got[mode] = (h.module.state_dict(), res.privacy["epsilon"], res.privacy["steps"])
    (a, eps_a, steps_a), (b, eps_b, steps_b) = got["hooks"], got["ghost"]
    assert eps_a == eps_b and steps_a == steps_b
    moved = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved < 1e-4, moved
    with pytest.raises(ConfigError, match="ghost: only with the task's own loss"):
        from keiryo.privacy.dp import make_private

        m, _ = prepare_module(load_model(SPEC, digits, output_name="logits").module)
        make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), digits.train, 256, 1,
                     DPConfig(target_epsilon=8, accountant="rdp", grad_sample_mode="ghost"), seed=0)  # fmt: skip


def test_a_dp_model_then_a_dp_step_reports_their_composition_not_the_last_one():
    """A model trained with DP, then a DP step of a recipe (fine-tune, distill, QAT) on the same data: the
    candidate's guarantee is their composition (accountants over both histories), never the step's alone;
    a federated model then a DP-SGD step add up by basic composition. The one-line summary says so."""
    from keiryo.privacy.dp import privacy_of, summary_line

    def sgd(sigma: float, q: float, steps: int, delta: float) -> dict:
        eps = epsilon_of("prv", [(sigma, q, steps)], delta)
        return {"mechanism": "DP-SGD", "epsilon": eps, "delta": delta, "accountant": "prv", "noise_multiplier": sigma,
                "sample_rate": q, "steps": steps, "unit": "one record of the train split"}  # fmt: skip

    trained, step = sgd(1.1, 0.2, 100, 1e-5), sgd(2.0, 0.2, 20, 1e-5)
    results = {"model": {"privacy": trained}}
    cand = {"report": {"steps": [{"info": {}}, {"info": {"privacy": step}}]}}
    rec = privacy_of(results, cand)
    want = epsilon_of("prv", [(1.1, 0.2, 100), (2.0, 0.2, 20)], 1e-5)
    assert rec["epsilon"] == pytest.approx(want, rel=1e-3) and rec["delta"] == 1e-5 and rec["steps"] == 120
    assert max(trained["epsilon"], step["epsilon"]) < rec["epsilon"] <= trained["epsilon"] + step["epsilon"]
    assert [p["epsilon"] for p in rec["composed_of"]] == [trained["epsilon"], step["epsilon"]]
    assert "2 DP-SGD runs" in summary_line(rec) and "\n" not in summary_line(rec)
    assert privacy_of(results, {"report": {"steps": []}}) == trained  # one record: itself
    assert privacy_of({"model": {}}, cand) == step

    federated = {"mechanism": "client-level local DP", "epsilon": 2.5, "delta": 1e-5, "accountant": "rdp", "rounds": 3}
    mixed = privacy_of({"model": {"privacy": federated}}, cand)
    assert mixed["mechanism"] == "basic composition" and mixed["epsilon"] == pytest.approx(2.5 + step["epsilon"], abs=1e-3)
    assert mixed["delta"] == pytest.approx(2e-5) and "add up" in summary_line(mixed)
