"""The fast DeepFool engine against a plain reference, and its GPU paths exercised on CPU.

The reference below is the engine as it was before the one-forward-per-iterate rewrite (issue
21), stripped of chunking and memory-format tricks: per step one inference forward for the flip
check, then one forward and K-1 backward passes. The engine must give the same iterations,
classes and convergence flags, and the same margins to float tolerance.
"""

import pytest
import torch
from torch import nn

from puma_ray.attacks import deepfool, fuse_conv_bn
from puma_ray.attacks.deepfool import STEP_EPS, _FoldedBatchNorm, _leading_class


def reference_deepfool(
    model, images, labels, *, norm="l2", overshoot=0.02, max_iter=50, clip=False, target="true"
):
    """Plain batched DeepFool (arXiv:1511.04599, Alg. 2 / eqs. 13-14, all classes)."""
    x0 = images.detach()
    with torch.no_grad():
        logits = model(x0)
    n, num_classes = logits.shape
    pred = logits.argmax(1)
    label = labels if target == "true" else pred
    classes = torch.arange(num_classes).expand(n, num_classes)
    others = classes[classes != label[:, None]].view(n, num_classes - 1)
    scale = 1.0 + overshoot
    r_tot = torch.zeros_like(x0)
    iters = torch.zeros(n, dtype=torch.long)
    converged = pred != label
    adv_class = pred.clone()
    active = torch.nonzero(~converged).squeeze(1)

    def iterate(rows):
        x = x0[rows] + scale * r_tot[rows]
        return x.clamp(0, 1) if clip else x

    for _ in range(max_iter):
        if len(active) == 0:
            break
        x = iterate(active).requires_grad_(True)
        out = model(x)
        y, ks = label[active], others[active]
        rows = torch.arange(len(active))
        best = torch.full((len(active),), torch.inf, dtype=x.dtype)
        best_w, best_norm = torch.zeros_like(x), torch.ones(len(active), dtype=x.dtype)
        for j in range(num_classes - 1):
            f = (out[rows, ks[:, j]] - out[rows, y]).detach().abs()
            (w,) = torch.autograd.grad(
                (out[rows, ks[:, j]] - out[rows, y]).sum(), x, retain_graph=True
            )
            w_norm = w.flatten(1).norm(dim=1) if norm == "l2" else w.flatten(1).abs().sum(1)
            ratio = torch.where(w_norm > 0, f / w_norm, torch.inf)
            better = ratio < best
            best = torch.where(better, ratio, best)
            best_norm = torch.where(better, w_norm, best_norm)
            best_w = torch.where(better.view(-1, 1, 1, 1), w, best_w)
        length = torch.where(torch.isfinite(best), best + STEP_EPS, 0.0).view(-1, 1, 1, 1)
        step = length * (best_w / best_norm.view(-1, 1, 1, 1) if norm == "l2" else best_w.sign())
        r_tot[active] += step
        iters[active] += 1
        with torch.no_grad():
            now = model(iterate(active)).argmax(1)
        flipped = now != label[active]
        adv_class[active[flipped]] = now[flipped]
        converged[active[flipped]] = True
        active = active[~flipped]
    perturbation = (iterate(torch.arange(n)) - x0) if clip else scale * r_tot
    flat = perturbation.flatten(1)
    margin = flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)
    return margin, adv_class, iters, converged


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation (no ties expected)."""
    ra, rb = (t.double().argsort().argsort().double() for t in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def bn_cnn(seed, dtype=torch.float64, width=8, num_classes=10):
    """A random conv-BN-ReLU net (eval mode, non-trivial BN statistics) that needs several
    DeepFool steps on uniform-noise inputs."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * width, num_classes),
    )
    with torch.no_grad():
        for bn in (model[1], model[5]):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return model.to(dtype).eval()


def noise(n, seed, dtype=torch.float64, size=8):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=gen, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"norm": "linf"},
        {"clip": True, "target": "predicted"},
        {"grad_batch": 5},  # chunks: graph reuse and refresh both happen
        {"fold_batchnorm": False},
        {"class_grads": "batched"},
        {"norm": "linf", "clip": True, "grad_batch": 3, "class_grads": "batched"},
    ],
)
def test_engine_matches_reference_over_several_iterations(settings):
    model = bn_cnn(seed=1)
    x = noise(24, seed=1)
    label = torch.randint(0, 10, (24,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        label[:18] = model(x[:18]).argmax(1)  # most correctly classified
    ref_keys = ("norm", "clip", "target")
    margin, adv_class, iters, converged = reference_deepfool(
        model, x, label, **{k: v for k, v in settings.items() if k in ref_keys}
    )
    res = deepfool(model, x, label, **settings)
    assert iters.float().mean() >= 2.5, "the model should need several steps"
    assert torch.equal(res.iters, iters) and torch.equal(res.converged, converged)
    assert torch.equal(res.adv_class, adv_class)
    torch.testing.assert_close(res.margin.double(), margin, rtol=1e-5, atol=1e-9)
    assert spearman(res.margin, margin) == pytest.approx(1.0, abs=1e-12)


def test_forwards_only_see_active_samples():
    """One forward per iterate: the clean one, then one per step taken, plus survivors that
    are re-forwarded when their chunk's graph was mostly flipped samples."""
    model = bn_cnn(seed=2)
    rows = []
    model.register_forward_hook(lambda m, inputs, out: rows.append(len(inputs[0])))
    x = noise(48, seed=2)
    res = deepfool(model, x, torch.zeros(48, dtype=torch.long), target="predicted", grad_batch=8)
    steps = int(res.iters.sum())
    assert steps >= 1.5 * 48  # several iterations
    assert 48 + steps <= sum(rows) <= 48 + 2 * steps
    rows.clear()
    one_chunk = deepfool(model, x, torch.zeros(48, dtype=torch.long), target="predicted")
    assert torch.equal(one_chunk.iters, res.iters)
    torch.testing.assert_close(one_chunk.margin, res.margin, rtol=1e-6, atol=1e-9)
    assert 48 + steps <= sum(rows) <= 48 + 2 * steps


def test_folded_batchnorm_is_the_same_function():
    model = bn_cnn(seed=3, dtype=torch.float32)
    x = noise(16, seed=3, dtype=torch.float32)
    with torch.no_grad():
        plain = model(x)
        with _FoldedBatchNorm():
            folded = model(x)
    torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-6)
    xg = x.clone().requires_grad_(True)
    (g_plain,) = torch.autograd.grad(model(xg)[:, 3].sum(), xg)
    with _FoldedBatchNorm():
        (g_folded,) = torch.autograd.grad(model(xg)[:, 3].sum(), xg)
    torch.testing.assert_close(g_folded, g_plain, rtol=1e-5, atol=1e-7)
    # Train mode (batch statistics, running-stat updates) is left to torch.
    model.train()
    before = model[1].running_mean.clone()
    with _FoldedBatchNorm():
        train_out = model(x)
    model.eval()
    assert not torch.equal(model[1].running_mean, before)
    assert not torch.allclose(train_out, plain)


def test_bf16_cpu_autocast_close_to_float32():
    """The GPU's bf16 path under CPU autocast, on a fixed model where bf16 logits tie near the
    boundary (without the tie rule 20 of 64 samples stall until max_iter): the same samples
    converge in about as many steps, and margins stay within 2% (median) and 10% (worst
    sample) of float32."""
    model = bn_cnn(seed=5, dtype=torch.float32)
    x = noise(64, seed=5, dtype=torch.float32)
    with torch.no_grad():
        label = model(x).argmax(1)
    for norm in ("l2", "linf"):
        fp32 = deepfool(model, x, label, norm=norm)
        bf16 = deepfool(
            model, x, label, norm=norm, autocast_dtype=torch.bfloat16, return_perturbation=True
        )
        assert fp32.iters.float().mean() >= 3, "the model should need several steps"
        assert fp32.converged.all() and torch.equal(bf16.converged, fp32.converged)
        assert bf16.iters.max() <= fp32.iters.max() + 2
        assert bf16.margin.dtype == bf16.perturbation.dtype == torch.float32
        rel = (bf16.margin - fp32.margin).abs() / fp32.margin
        assert rel.median() < 2e-2 and rel.max() < 1e-1
        assert spearman(bf16.margin, fp32.margin) > 0.99


def test_autocast_tie_with_the_label_leaves_the_class():
    logits = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [2.0, 1.0, 0.5], [0.0, 3.0, 3.0]])
    label = torch.tensor([0, 1, 0, 2])
    assert _leading_class(logits, label).tolist() == [1, 0, 0, 1]


@pytest.mark.parametrize("grad_batch", [4096, 8192])
def test_gpu_sized_chunks_equal_unchunked(grad_batch):
    """Chunk sizes a GPU would use (the whole active set, or 4096/8192-row passes) on an
    affine model, so it stays fast: the same result as one pass and as CPU-sized chunks."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval()
    x = torch.rand(10_000, 1, 4, 4)
    label = torch.randint(0, 10, (10_000,), generator=torch.Generator().manual_seed(5))
    one_pass = deepfool(model, x, label, grad_batch=len(x), target="predicted")
    chunked = deepfool(model, x, label, grad_batch=grad_batch, target="predicted")
    for name in ("pred", "adv_class", "iters", "converged"):
        assert torch.equal(getattr(chunked, name), getattr(one_pass, name))
    torch.testing.assert_close(chunked.margin, one_pass.margin, rtol=1e-5, atol=1e-7)
    assert (one_pass.iters >= 1).all() and one_pass.converged.all()


def test_gpu_sized_chunks_on_a_multi_step_model():
    model = bn_cnn(seed=6, width=4)
    x = noise(120, seed=6, size=6)
    label = torch.zeros(120, dtype=torch.long)
    results = [deepfool(model, x, label, target="predicted", grad_batch=b) for b in (4096, 64, 9)]
    assert results[0].iters.float().mean() > 2
    for res in results[1:]:
        for name in ("adv_class", "iters", "converged"):
            assert torch.equal(getattr(res, name), getattr(results[0], name))
        torch.testing.assert_close(res.margin, results[0].margin, rtol=1e-6, atol=1e-9)


def test_class_grads_must_be_known():
    with pytest.raises(ValueError, match="class_grads must be"):
        deepfool(bn_cnn(seed=7), noise(2, seed=7), torch.tensor([0, 1]), class_grads="vmap")


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.net = bn_cnn(seed=8, dtype=torch.float32)

    def forward(self, x):
        return self.net(x) if x.sum() > 0 else -self.net(x)


def test_fuse_conv_bn_folds_pairs_and_keeps_margins():
    model = bn_cnn(seed=9, dtype=torch.float32)
    fused = fuse_conv_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # a copy
    x = noise(32, seed=9, dtype=torch.float32)
    with torch.no_grad():
        label = model(x).argmax(1)
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-6)
    plain, folded = deepfool(model, x, label), deepfool(fused, x, label)
    assert torch.equal(folded.converged, plain.converged)
    torch.testing.assert_close(folded.margin, plain.margin, rtol=1e-3, atol=1e-6)
    assert spearman(folded.margin, plain.margin) > 0.999
    untraceable = Untraceable().eval()
    assert fuse_conv_bn(untraceable) is untraceable
    with pytest.raises(ValueError, match="eval mode"):
        fuse_conv_bn(model.train())
