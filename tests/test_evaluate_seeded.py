"""Evaluation is a function of (model, data, seed): PGD's random starts are drawn per row, so
neither the batch size nor whatever used torch's global generator before changes the number."""

import torch

from puma_ray.attacks.pgd import pgd
from puma_ray.evaluate import robust_accuracy


def _model():
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    )


def _data(n=40):
    g = torch.Generator().manual_seed(5)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_robust_accuracy_ignores_batching_and_global_rng():
    model, (x, y) = _model(), _data()
    kw = dict(norm="linf", steps=3, restarts=2)
    torch.manual_seed(0)
    a = robust_accuracy(model, x, y, 0.1, batch_size=40, **kw)
    torch.manual_seed(12345)
    torch.rand(1000)  # something else consumed the global generator
    b = robust_accuracy(model, x, y, 0.1, batch_size=7, **kw)
    assert a == b


def test_row_seeded_starts_depend_on_the_row_seed_only():
    model, (x, y) = _model(), _data(6)
    seeds = torch.arange(6, dtype=torch.int64) * 11
    for norm, eps in (("linf", 0.1), ("l2", 0.5)):
        full = pgd(model, x, y, eps, norm=norm, steps=1, row_seeds=seeds)
        part = pgd(model, x[2:5], y[2:5], eps, norm=norm, steps=1, row_seeds=seeds[2:5])
        torch.testing.assert_close(full[2:5], part, rtol=0, atol=1e-6)
        other = pgd(model, x, y, eps, norm=norm, steps=1, row_seeds=seeds + 1)
        assert not torch.equal(full, other)  # a different seed draws different starts


def test_a_different_seed_can_change_the_number_but_repeats_exactly():
    model, (x, y) = _model(), _data()
    kw = dict(norm="linf", steps=1, restarts=1, batch_size=16)
    assert robust_accuracy(model, x, y, 0.3, seed=1, **kw) == robust_accuracy(
        model, x, y, 0.3, seed=1, **kw
    )
