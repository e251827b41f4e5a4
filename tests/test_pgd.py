"""PGD / TRADES attacks with per-sample epsilon (pure PyTorch, CPU)."""

import pytest
import torch
import torch.nn as nn

from puma_ray.attacks.pgd import pgd, trades_adv


def _cnn(seed=0, classes=10):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(128, classes),
    ).eval()


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("attack", ["pgd", "trades"])
def test_inside_each_ball_and_box(norm, attack):
    model = _cnn()
    x = torch.rand(16, 3, 8, 8)
    y = torch.randint(0, 10, (16,))
    eps = torch.linspace(0, 0.5, 16)
    if attack == "pgd":
        adv = pgd(model, x, y, eps, norm=norm, steps=5)
    else:
        adv = trades_adv(model, x, eps, norm=norm, steps=5)
    assert adv.min() >= 0 and adv.max() <= 1
    d = (adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-6).all()
    assert torch.equal(adv[0], x[0])  # eps 0: exactly the clean input
    assert (size[1:] > 0).all()  # every other sample moved


def test_zero_eps_rows_stay_clean_and_params_untouched():
    model = _cnn()
    x = torch.rand(8, 3, 8, 8)
    y = torch.randint(0, 10, (8,))
    eps = torch.tensor([0.0, 8 / 255] * 4)
    adv = pgd(model, x, y, eps, steps=3)
    assert torch.equal(adv[0::2], x[0::2])
    assert all(p.grad is None for p in model.parameters())


def _binary_linear(dim=20, seed=1):
    torch.manual_seed(seed)
    lin = nn.Linear(dim, 2).double()
    return nn.Sequential(nn.Flatten(), lin), lin


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_finds_the_analytic_worst_case_on_a_linear_model(norm):
    model, lin = _binary_linear()
    x = 0.3 + 0.4 * torch.rand(6, 1, 4, 5, dtype=torch.float64)  # far from the box edges
    y = torch.randint(0, 2, (6,))
    eps = 0.05
    adv = pgd(model, x, y, eps, norm=norm, steps=80, step_ratio=0.25)
    w = lin.weight[1 - y] - lin.weight[y]  # direction that raises the wrong logit
    if norm == "linf":
        best = x.flatten(1) + eps * w.sign()
    else:
        best = x.flatten(1) + eps * w / w.norm(dim=1, keepdim=True)
    # l2 converges geometrically onto the optimum: the angle shrinks ~0.8x per step
    torch.testing.assert_close(adv.flatten(1), best.detach(), atol=eps * 1e-4, rtol=0)


def test_bad_eps_is_refused():
    model = _cnn()
    x = torch.rand(4, 3, 8, 8)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="eps must be"):
        pgd(model, x, y, torch.tensor([0.1, -0.1, 0.1, 0.1]))
    with pytest.raises(ValueError, match="shape"):
        pgd(model, x, y, torch.ones(3))
    with pytest.raises(ValueError, match="norm"):
        pgd(model, x, y, 0.1, norm="l1")
