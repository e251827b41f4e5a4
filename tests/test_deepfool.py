"""DeepFool engine: exact on affine models, batch-independent, and honest about non-convergence."""

import pytest
import torch
from torch import nn

from puma_ray.attacks import DeepFoolResult, deepfool
from puma_ray.attacks.deepfool import STEP_EPS


def linear_model(shape, num_classes, seed, dtype=torch.float64):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(shape).prod()), num_classes))
    return model.to(dtype).eval()


def analytic_distance(model, x, label, dual_norm):
    """min_{k != y} |(w_k - w_y).x + (b_k - b_y)| / ||w_k - w_y||_dual, per sample."""
    weight, bias = model[1].weight.double(), model[1].bias.double()
    x = x.double().flatten(1)
    w_diff = weight[None] - weight[label][:, None]  # [N, K, D]
    f_diff = x @ weight.T + bias - (x @ weight.T + bias).gather(1, label[:, None])
    dist = f_diff.abs() / torch.linalg.vector_norm(w_diff, ord=dual_norm, dim=2)
    dist[torch.arange(len(x)), label] = torch.inf
    return dist.min(dim=1).values


def small_cnn(seed, dtype=torch.float64, num_classes=10):
    """A random conv-BN-ReLU-pool net in eval mode with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes),
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.to(dtype).eval()


def images(n, seed, dtype=torch.float64, size=8):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=gen, dtype=torch.float64).to(dtype)


def predictions(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


@pytest.mark.parametrize("norm,dual", [("l2", 2), ("linf", 1)])
@pytest.mark.parametrize("overshoot", [0.0, 0.02])
@pytest.mark.parametrize("shape,num_classes", [((1, 3, 4), 5), ((3, 8, 8), 10), ((2, 5, 3), 3)])
def test_linear_margin_is_analytic_distance(norm, dual, overshoot, shape, num_classes):
    model = linear_model(shape, num_classes, seed=num_classes)
    x = torch.rand(64, *shape, dtype=torch.float64)
    label = predictions(model, x)
    res = deepfool(model, x, label, norm=norm, overshoot=overshoot)
    dist = analytic_distance(model, x, label, dual)
    # One step lands STEP_EPS beyond the exact boundary; the overshoot scales the total.
    expected = (1 + overshoot) * (dist + STEP_EPS)
    torch.testing.assert_close(res.margin.double(), expected, rtol=1e-6, atol=0)
    assert res.converged.all() and (res.iters == 1).all()
    assert (res.adv_class != label).all()


@pytest.mark.parametrize("norm,dual", [("l2", 2), ("linf", 1)])
def test_linear_margin_float32_within_1e4_relative(norm, dual):
    model = linear_model((3, 6, 6), 10, seed=1, dtype=torch.float32)
    x = torch.rand(128, 3, 6, 6)
    label = predictions(model, x)
    res = deepfool(model, x, label, norm=norm, overshoot=0.0)
    dist = analytic_distance(model, x, label, dual)
    rel = (res.margin.double() - dist).abs() / dist
    assert rel.max() < 1e-4 + STEP_EPS / dist.min()
    assert ((res.margin.double() - dist - STEP_EPS).abs() / dist).max() < 1e-4


def test_binary_affine_converges_in_one_step():
    model = linear_model((2, 4, 4), 2, seed=3)
    x = torch.rand(32, 2, 4, 4, dtype=torch.float64)
    label = predictions(model, x)
    res = deepfool(model, x, label)
    assert res.converged.all() and (res.iters == 1).all()
    assert (res.adv_class == 1 - label).all()


def test_misclassified_has_zero_margin_and_target_predicted_differs():
    model = linear_model((1, 3, 4), 5, seed=4)
    x = torch.rand(16, 1, 3, 4, dtype=torch.float64)
    pred = predictions(model, x)
    wrong = (pred + 1) % 5
    res = deepfool(model, x, wrong, target="true")
    assert (res.margin == 0).all() and (res.iters == 0).all() and res.converged.all()
    assert torch.equal(res.adv_class, pred) and torch.equal(res.pred, pred)
    by_pred = deepfool(model, x, wrong, target="predicted")
    assert (by_pred.margin > 0).all() and (by_pred.iters == 1).all() and by_pred.converged.all()
    assert (by_pred.adv_class != pred).all()


class ConstantLogits(nn.Module):
    """Logits that favour class 0 whatever the input: no gradient, no way out."""

    def forward(self, x):
        logits = torch.tensor([3.0, 1.0, 0.0], dtype=x.dtype)
        return logits + 0 * x.flatten(1).sum(1, keepdim=True)


def test_unflippable_model_reports_not_converged():
    x = torch.rand(4, 1, 2, 2)
    res = deepfool(ConstantLogits(), x, torch.zeros(4, dtype=torch.long), max_iter=7)
    assert not res.converged.any()
    assert (res.iters == 7).all() and (res.margin == 0).all() and (res.adv_class == 0).all()


def test_max_iter_reached_reports_norm_reached():
    model = small_cnn(seed=5)
    x = images(48, seed=5)
    label = predictions(model, x)
    res = deepfool(model, x, label, overshoot=0.0, max_iter=1, return_perturbation=True)
    stuck = ~res.converged
    assert stuck.any(), "expected some samples not to flip in one undershooting step"
    assert (res.iters == 1).all() and (res.adv_class[stuck] == label[stuck]).all()
    reached = res.perturbation.flatten(1).norm(dim=1).float()
    assert (res.margin[stuck] > 0).all()
    torch.testing.assert_close(res.margin, reached)
    full = deepfool(model, x, label, overshoot=0.0, max_iter=50)
    assert full.converged[stuck].all() and (full.iters[stuck] > 1).all()


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"norm": "linf"},
        {"candidates": 3, "clip": True},
        {"norm": "linf", "target": "predicted", "overshoot": 0.1},
    ],
)
def test_batch_equals_one_at_a_time(settings):
    model = small_cnn(seed=6)
    x = images(24, seed=6)
    label = torch.randint(0, 10, (24,), generator=torch.Generator().manual_seed(6))
    label[:12] = predictions(model, x[:12])  # half correctly classified
    batch = deepfool(model, x, label, return_perturbation=True, **settings)
    singles = [deepfool(model, x[i : i + 1], label[i : i + 1], **settings) for i in range(24)]
    for name in ("adv_class", "pred", "iters", "converged"):
        assert torch.equal(getattr(batch, name), torch.cat([getattr(s, name) for s in singles]))
    margins = torch.cat([s.margin for s in singles])
    torch.testing.assert_close(batch.margin, margins, rtol=1e-6, atol=1e-9)
    assert (batch.iters[:12] > 0).any() and batch.converged.all()
    chunked = deepfool(model, x, label, grad_batch=5, **settings)
    for name in ("adv_class", "iters", "converged"):
        assert torch.equal(getattr(chunked, name), getattr(batch, name))
    torch.testing.assert_close(chunked.margin, batch.margin, rtol=1e-6, atol=1e-9)


def test_finished_samples_cost_nothing():
    """Forwards only see samples still in their class (the active set shrinks): one forward per
    iterate (the clean one, then one per step taken), plus at most one re-forward per step (a
    survivor of a chunk whose graph was mostly flipped samples)."""
    model = small_cnn(seed=7)
    rows = []
    model.register_forward_hook(lambda module, inputs, output: rows.append(len(inputs[0])))
    x = images(32, seed=7)
    res = deepfool(model, x, torch.randint(0, 10, (32,)))
    steps = int(res.iters.sum())
    assert 32 + steps <= sum(rows) <= 32 + 2 * steps


def test_all_candidates_topk_and_approximation():
    model = small_cnn(seed=8, dtype=torch.float32)
    x = images(32, seed=8, dtype=torch.float32)
    label = predictions(model, x)
    exact = deepfool(model, x, label)
    for k in (10, 11):
        topk = deepfool(model, x, label, candidates=k)
        for name in ("margin", "adv_class", "iters", "converged"):
            assert torch.equal(getattr(topk, name), getattr(exact, name))
    approx = deepfool(model, x, label, candidates=2)
    assert torch.isfinite(approx.margin).all() and (approx.iters >= 1).all()
    assert approx.converged.float().mean() > 0.9


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_clip_keeps_iterates_in_box_and_perturbation_norm_is_margin(norm):
    model = small_cnn(seed=9)
    x = images(32, seed=9).round()  # pixels at 0 or 1: clipping is active
    label = predictions(model, x)
    res = deepfool(model, x, label, norm=norm, clip=True, return_perturbation=True)
    adv = x + res.perturbation
    assert res.perturbation.shape == x.shape and res.perturbation.dtype == torch.float64
    assert res.perturbation.is_contiguous()
    assert adv.min() >= 0 and adv.max() <= 1
    flat = res.perturbation.flatten(1)
    reached = flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)
    torch.testing.assert_close(res.margin, reached.float())
    done = res.converged
    assert done.any() and torch.equal(predictions(model, adv)[done], res.adv_class[done])
    assert deepfool(model, x, label).perturbation is None


def test_unclipped_adversarial_flips_and_float32_dtypes():
    model = small_cnn(seed=10, dtype=torch.float32)
    x = images(32, seed=10, dtype=torch.float32)
    label = predictions(model, x)
    params = [(p.requires_grad, p.grad) for p in model.parameters()]
    res = deepfool(model, x, label, norm="linf", return_perturbation=True)
    assert isinstance(res, DeepFoolResult)
    assert res.margin.dtype == torch.float32 and res.perturbation.dtype == torch.float32
    assert res.adv_class.dtype == res.iters.dtype == res.pred.dtype == torch.int64
    assert res.converged.dtype == torch.bool and res.converged.all()
    assert torch.equal(predictions(model, x + res.perturbation), res.adv_class)
    assert (res.adv_class != label).all()
    assert params == [(p.requires_grad, p.grad) for p in model.parameters()]


def test_autocast_bf16_runs_with_float32_accumulation():
    model = small_cnn(seed=11, dtype=torch.float32)
    x = images(16, seed=11, dtype=torch.float32)
    label = predictions(model, x)
    res = deepfool(model, x, label, autocast_dtype=torch.bfloat16, return_perturbation=True)
    assert res.perturbation.dtype == torch.float32 and torch.isfinite(res.margin).all()
    ref = deepfool(model, x, label)
    assert ((res.margin - ref.margin).abs() / ref.margin).median() < 0.1


def test_empty_batch():
    res = deepfool(small_cnn(seed=12), torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long))
    assert res.margin.shape == (0,) and res.iters.shape == (0,)


@pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)
def test_cuda_matches_cpu_and_bf16_runs():
    model = small_cnn(seed=13, dtype=torch.float32)
    x = images(64, seed=13, dtype=torch.float32)
    label = predictions(model, x)
    cpu = deepfool(model, x, label)
    gpu = deepfool(model.cuda(), x.cuda(), label.cuda())
    torch.testing.assert_close(gpu.margin.cpu(), cpu.margin, rtol=1e-3, atol=1e-5)
    bf16 = deepfool(model, x.cuda(), label.cuda(), autocast_dtype=torch.bfloat16)
    assert bf16.margin.dtype == torch.float32 and torch.isfinite(bf16.margin).all()
    assert ((bf16.margin.cpu() - cpu.margin).abs() / cpu.margin).median() < 0.1


@pytest.mark.parametrize(
    "x_shape,labels,kwargs,message",
    [
        ((2, 3, 8), [0, 1], {}, "4-D NCHW"),
        ((2, 3, 8, 8), [0, 1, 2], {}, "one entry per image"),
        ((2, 3, 8, 8), [0, 10], {}, r"labels must be in \[0, 10\)"),
        ((2, 3, 8, 8), [-1, 0], {}, r"labels\[0\] = -1"),
        ((2, 3, 8, 8), [0, 1], {"norm": "l1"}, "norm must be"),
        ((2, 3, 8, 8), [0, 1], {"candidates": 1}, "candidates must be"),
        ((2, 3, 8, 8), [0, 1], {"max_iter": 0}, "max_iter must be"),
        ((2, 3, 8, 8), [0, 1], {"target": "label"}, "target must be"),
        ((2, 3, 8, 8), [0, 1], {"overshoot": -0.1}, "overshoot must be"),
        ((2, 3, 8, 8), [0, 1], {"grad_batch": 0}, "grad_batch must be"),
    ],
)
def test_bad_input_raises_value_error(x_shape, labels, kwargs, message):
    model = small_cnn(seed=14, dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        deepfool(model, torch.rand(x_shape), torch.tensor(labels), **kwargs)


def test_bad_dtypes_raise_value_error():
    model = small_cnn(seed=14, dtype=torch.float32)
    with pytest.raises(ValueError, match="floating point"):
        deepfool(model, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer class indices"):
        deepfool(model, torch.rand(2, 3, 8, 8), torch.tensor([0.0, 1.0]))
