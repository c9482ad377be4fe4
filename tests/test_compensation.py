"""Calibration input forms, data-driven criteria and retraining-free compensation."""

import pytest
import torch
import torchvision
from helpers import assert_untouched, snapshot
from test_importance import DEAD, planted

import graphprune as gp
from graphprune.calibration import Calibration


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    from graphprune.zoo import lively_init

    model = lively_init(torchvision.models.resnet18().eval())
    return model, torch.randn(1, 3, 32, 32), [torch.randn(4, 3, 32, 32) for _ in range(3)]


def test_compensation_is_exact_preserving_on_dead_channels():
    net, x = planted()
    cal = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    plan = gp.plan(net, x, ratio=1 / 8, ignore=[net.c2, net.fc])
    assert [m.removed for g in plan.groups for m in g.members if m.name == "c1.weight"] == [(DEAD,)]
    plain = gp.apply(net, plan)
    for mode in ("lstsq", "bias", "bn"):
        comp = gp.apply(net, plan, calibration=cal, compensation=mode)
        for (n, a), b in zip(plain.state_dict().items(), comp.state_dict().values()):
            assert torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-7), f"{mode} changed {n}"


@pytest.mark.parametrize("mode", ["lstsq", "bias"])
def test_compensation_never_increases_layer_error(resnet, mode):
    model, x, cal = resnet
    snap = snapshot(model)
    plan = gp.plan(model, x, macs=0.5, ignore=[model.fc])
    slim = gp.apply(model, plan)
    report = gp.compensate(model, slim, plan, cal, mode=mode)
    assert_untouched(model, snap)
    assert report.layers and not report.skipped
    for name, (before, after) in report.layers.items():
        assert after <= before * (1 + 1e-9) + 1e-9, name
    assert sum(a for _, a in report.layers.values()) < sum(b for b, _ in report.layers.values())
    with torch.no_grad():
        ref = [model(b) for b in cal]
        err = sum(float((slim(b) - r).norm()) for b, r in zip(cal, ref))
        raw = gp.apply(model, plan)
        err0 = sum(float((raw(b) - r).norm()) for b, r in zip(cal, ref))
    assert err < err0


@pytest.mark.parametrize("importance", ["taylor", "obd", "activation", "wanda"])
def test_data_driven_criteria(resnet, importance):
    model, x, cal = resnet
    snap = snapshot(model)
    plan = gp.plan(model, x, ratio=0.3, importance=importance, ignore=[model.fc], calibration=cal)
    assert_untouched(model, snap)
    assert all(p.grad is None for p in model.parameters())
    gp.verify(model, gp.apply(model, plan), plan, x)
    with pytest.raises(gp.InvalidArgumentError, match="needs calibration"):
        gp.plan(model, x, importance=importance)


def test_calibration_forms():
    t = torch.randn(2, 3)
    assert len(list(Calibration(t))) == 1
    assert len(list(Calibration([t, t, t], max_batches=2))) == 2
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(6, 3), torch.arange(6)),
                                         batch_size=2)
    batches = list(Calibration(loader))
    assert len(batches) == 3 and all(isinstance(b, torch.Tensor) and b.shape == (2, 3) for b in batches)
    assert list(Calibration({"input_ids": t}))[0].keys() == {"input_ids"}


def test_bad_calibration(resnet):
    model, x, _ = resnet
    snap = snapshot(model)
    plan = gp.plan(model, x, ratio=0.3, ignore=[model.fc])
    for bad, match in (([], "empty"), ([torch.randn(2, 5)], "does not fit|fails|size"),
                       (["text"], "not a tensor"), (42, "must be a tensor")):
        with pytest.raises(gp.GraphPruneError, match=match) as err:
            gp.plan(model, x, importance="taylor", calibration=bad)
        assert "\n" not in str(err.value)
    with pytest.raises(gp.InvalidArgumentError, match="max_batches"):
        gp.apply(model, plan, calibration=[x], max_batches=0)
    with pytest.raises(gp.InvalidArgumentError, match="needs calibration"):
        gp.apply(model, plan, compensation="lstsq")
    assert_untouched(model, snap)


def test_bn_recalibration_reduces_output_error(resnet):
    model, x, cal = resnet
    plan = gp.plan(model, x, macs=0.5, ignore=[model.fc])
    raw = gp.apply(model, plan)
    fixed = gp.apply(model, plan, calibration=cal, compensation="bn")
    with torch.no_grad():
        err = [sum(float((m(b) - model(b)).norm()) for b in cal) for m in (raw, fixed)]
    assert err[1] < err[0]


def test_group_lasso_drives_whole_units_to_zero():
    from test_importance import Net

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(8, 3, 8, 8)
    reg = gp.GroupLasso(net, x, lam=1.0, ignore=[net.fc])
    bn = gp.BNL1(net, lam=1.0)
    first = float(reg())
    assert first > 0 and float(bn()) > 0
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        (reg() + bn()).backward()
        opt.step()
    assert float(reg()) < 0.2 * first
    plan = gp.plan(net.eval(), x, ratio=0.5, ignore=[net.fc])
    gp.verify(net, gp.apply(net, plan), plan, x)


def test_transformer_consumers_are_fitted_to_the_norm_input():
    """BERT's output projections feed LayerNorm(dense(h) + residual): least
    squares fits the norm's input (absorbing the residual's drift from earlier
    layers) and never makes that error worse."""
    import transformers

    from graphprune.apply.compensate import norm_targets

    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=100)
    model = transformers.BertModel(cfg).eval()
    cal = [{"input_ids": torch.randint(0, 100, (4, 12))} for _ in range(4)]
    plan = gp.plan(model, cal[0], ratio=0.25, heads=0.25)
    norms = norm_targets(model, plan, {n for n, _ in model.named_modules()})
    assert norms == {f"encoder.layer.{i}.{p}.dense": f"encoder.layer.{i}.{p}.LayerNorm"
                     for i in range(2) for p in ("attention.output", "output")}
    snap = snapshot(model)
    slim = gp.apply(model, plan)
    report = gp.compensate(model, slim, plan, cal)
    assert_untouched(model, snap)
    assert set(report.layers) == set(norms)
    for name, (before, after) in report.layers.items():
        assert after <= before * (1 + 1e-9) + 1e-9, name

    def norm_input_error(net):
        grab = {}
        hook = net.encoder.layer[1].output.LayerNorm.register_forward_pre_hook(
            lambda m, a: grab.__setitem__("z", a[0]))
        with torch.no_grad():
            net(**cal[0])
        hook.remove()
        return grab["z"]

    ref = norm_input_error(model)
    assert float((norm_input_error(slim) - ref).norm()) < float((norm_input_error(gp.apply(model, plan)) - ref).norm())
