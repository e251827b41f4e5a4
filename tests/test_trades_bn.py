"""TRADES and BatchNorm (pure PyTorch, CPU, no Ray): the separate-forward loss (the reference
code's) and the concatenated one against references written from the formula, the running
statistics one step leaves, the attack's BatchNorm modes and starts, and two forwards through
DDP (gloo)."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from puma_ray.config import AttackConfig, TrainingConfig, load_config
from puma_ray.train.step import EMA, adversarial_batch, train_step, training_loss

BETA, SMOOTHING, MOMENTUM = 5.0, 0.1, 0.3
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "tune_configs")


def _net(bn: bool = True, seed: int = 0) -> nn.Module:
    """A BatchNorm on the input (its expected running statistics are a formula of the input
    alone), a conv, a second BatchNorm, a linear head; in train mode."""
    torch.manual_seed(seed)
    norm = (lambda c: nn.BatchNorm2d(c, momentum=MOMENTUM)) if bn else (lambda c: nn.Identity())
    return nn.Sequential(
        norm(3),
        nn.Conv2d(3, 6, 3, padding=1),
        norm(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 4),
    ).train()


def _batch(n: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 6, 6, generator=g)
    # an "adversarial" batch whose statistics differ from the clean one's
    x_adv = (x + 0.2 * torch.rand(x.shape, generator=g) - 0.05).clamp(0, 1)
    return x, x_adv, torch.randint(0, 4, (n,), generator=g)


def _reference_loss(clean: torch.Tensor, adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CE(f(x), y) with label smoothing + beta * KL(f(x_adv) || f(x)), batchmean, written out
    (Wang et al.'s SmoothCrossEntropyLoss and Zhang et al.'s KLDivLoss(sum) / batch size)."""
    logp = clean.log_softmax(1)
    nll = -logp.gather(1, y[:, None]).squeeze(1)
    ce = ((1 - SMOOTHING) * nll + SMOOTHING * -logp.mean(1)).mean()
    p, log_q = clean.softmax(1), adv.log_softmax(1)
    kl = (p * (p.log() - log_q)).sum() / len(y)
    return ce + BETA * kl


def _loss(model, x, x_adv, y, forward):
    return training_loss(
        model,
        x,
        x_adv,
        y,
        objective="trades",
        trades_beta=BETA,
        label_smoothing=SMOOTHING,
        trades_forward=forward,
    )


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("forward", ["separate", "concatenated"])
def test_loss_and_gradients_match_the_reference(forward):
    x, x_adv, y = _batch()
    model = _net()
    ref_model = copy.deepcopy(model)
    loss, adv, clean = _loss(model, x, x_adv, y, forward)
    if forward == "separate":  # two forwards, as Zhang et al.'s and Wang et al.'s code
        ref_clean, ref_adv = ref_model(x), ref_model(x_adv)
    else:
        both = ref_model(torch.cat([x, x_adv]))
        ref_clean, ref_adv = both[: len(x)], both[len(x) :]
    ref = _reference_loss(ref_clean, ref_adv, y)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(clean, ref_clean)
    torch.testing.assert_close(adv, ref_adv)
    loss.backward()
    ref.backward()
    for g, r in zip(_grads(model), _grads(ref_model), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_the_two_forwards_differ_only_through_batchnorm():
    x, x_adv, y = _batch()
    bn = _net()
    sep = _loss(copy.deepcopy(bn), x, x_adv, y, "separate")[0]
    cat = _loss(copy.deepcopy(bn), x, x_adv, y, "concatenated")[0]
    assert (
        abs(float((sep - cat).detach())) > 1e-3
    )  # the option really changes the loss on a BN model
    plain = _net(bn=False)
    sep = _loss(plain, x, x_adv, y, "separate")[0]
    cat = _loss(plain, x, x_adv, y, "concatenated")[0]
    torch.testing.assert_close(sep, cat)  # and nothing else
    # in eval mode BatchNorm uses its running statistics: again no difference
    bn.eval()
    torch.testing.assert_close(
        _loss(bn, x, x_adv, y, "separate")[0], _loss(bn, x, x_adv, y, "concatenated")[0]
    )


def _tcfg(**kw) -> TrainingConfig:
    return TrainingConfig(
        objective="trades",
        trades_beta=BETA,
        label_smoothing=SMOOTHING,
        attack=AttackConfig(epsilon=0.1, steps=2),
        **kw,
    )


def _step(model, x, y, eps, tcfg, amp=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    kw = {} if amp is None else {"amp": amp}
    return train_step(model, x, y, eps, tcfg, opt, sched, **kw)


def _expected_running(r_mean, r_var, *batches):
    """BatchNorm's running mean and (unbiased) variance after one update per batch."""
    for b in batches:
        r_mean = (1 - MOMENTUM) * r_mean + MOMENTUM * b.mean(dim=(0, 2, 3))
        r_var = (1 - MOMENTUM) * r_var + MOMENTUM * b.transpose(0, 1).flatten(1).var(dim=1)
    return r_mean, r_var


@pytest.mark.parametrize("attack_bn", ["batch", "running"])
@pytest.mark.parametrize("forward", ["separate", "concatenated"])
def test_running_statistics_after_one_step(forward, attack_bn):
    x, _, y = _batch()
    eps = torch.full((len(y),), 0.1)
    eps[::4] = 0.0  # per-sample eps, some rows clean
    tcfg = _tcfg(trades_forward=forward, trades_attack_bn=attack_bn)
    model = _net()
    before = copy.deepcopy(model)
    torch.manual_seed(7)
    _step(model, x, y, eps, tcfg)
    # the same attack again, on the weights before the step (it changes no buffer: see below)
    torch.manual_seed(7)
    x_adv = adversarial_batch(
        copy.deepcopy(before),
        x,
        y,
        eps,
        objective="trades",
        attack=tcfg.attack,
        trades_attack_bn=attack_bn,
    )
    bn0 = model[0]
    r0_mean, r0_var = torch.zeros(3), torch.ones(3)
    if forward == "separate":  # two updates: the clean batch, then the adversarial one
        want_mean, want_var = _expected_running(r0_mean, r0_var, x, x_adv)
        assert int(bn0.num_batches_tracked) == 2
    else:
        want_mean, want_var = _expected_running(r0_mean, r0_var, torch.cat([x, x_adv]))
        assert int(bn0.num_batches_tracked) == 1
    torch.testing.assert_close(bn0.running_mean, want_mean)
    torch.testing.assert_close(bn0.running_var, want_var)
    # every BatchNorm (also the one behind the conv) as the plain forwards leave them
    if forward == "separate":
        before(x), before(x_adv)
    else:
        before(torch.cat([x, x_adv]))
    for (name, got), (_, want) in zip(model.named_buffers(), before.named_buffers(), strict=True):
        torch.testing.assert_close(got, want, msg=name)
    ema = EMA(model, 0.99)
    ema.update(model)
    for got, want in zip(ema.model.buffers(), model.buffers(), strict=True):
        torch.testing.assert_close(got, want)  # the EMA evaluates with these statistics


def test_train_step_under_autocast_keeps_two_updates():
    x, _, y = _batch()
    model = _net()
    loss, adv, clean = _step(
        model,
        x,
        y,
        torch.full((len(y),), 0.1),
        _tcfg(),
        amp=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    )
    assert torch.isfinite(loss) and adv.dtype == clean.dtype == torch.float32
    assert int(model[0].num_batches_tracked) == 2


@pytest.mark.parametrize("attack_bn", ["batch", "running"])
def test_the_trades_attack_changes_no_buffer_and_restores_the_mode(attack_bn):
    x, _, y = _batch()
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adversarial_batch(
        model,
        x,
        y,
        0.1,
        objective="trades",
        attack=AttackConfig(epsilon=0.1, steps=3),
        trades_attack_bn=attack_bn,
    )
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(p.grad is None for p in model.parameters())


def _one_step_reference(model, x, eps, step):
    """One l-inf TRADES step from a uniform start, as Wang et al.'s trades_loss, on whatever
    mode `model` is in (train: batch statistics; eval: running statistics)."""
    x_adv = (x + (torch.rand_like(x) * 2 - 1) * eps).clamp(0, 1)
    with torch.no_grad():
        p_nat = model(x).softmax(1)
    x_adv.requires_grad_(True)
    kl = F.kl_div(model(x_adv).log_softmax(1), p_nat, reduction="batchmean")
    (grad,) = torch.autograd.grad(kl, x_adv)
    x_adv = x_adv.detach() + step * grad.sign()
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)


def test_the_attack_bn_modes_are_batch_and_running_statistics():
    x, _, y = _batch()
    model = _net()
    # running statistics far from this batch's, so the two modes see different models
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(0.3)
            m.running_var.fill_(2.0)
    attack = AttackConfig(epsilon=0.1, steps=1, step_ratio=0.25)
    got = {}
    for bn in ("batch", "running"):
        torch.manual_seed(3)
        got[bn] = adversarial_batch(
            model, x, y, 0.1, objective="trades", attack=attack, trades_attack_bn=bn
        )
        ref_model = copy.deepcopy(model).train(bn == "batch")
        torch.manual_seed(3)
        want = _one_step_reference(ref_model, x, 0.1, 0.025)
        torch.testing.assert_close(got[bn], want, rtol=0, atol=1e-6)
    assert not torch.allclose(got["batch"], got["running"])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_auto_start_is_uniform_for_linf_and_small_normal_for_l2(norm):
    x, _, y = _batch(n=64)
    x = 0.25 + 0.5 * x  # away from the box, so the start is not clipped
    eps = 0.2 if norm == "linf" else 1.0
    # a negligible step: what comes back is the start, projected
    attack = AttackConfig(norm=norm, epsilon=eps, steps=1, step_ratio=1e-9)
    out = {}
    for start in ("auto", "uniform", "normal"):
        torch.manual_seed(0)
        out[start] = adversarial_batch(
            _net(), x, y, eps, objective="trades", attack=attack, trades_start=start
        )
    size = {k: (v - x).flatten(1).abs().amax(1) for k, v in out.items()}
    assert size["normal"].max() < 0.01 and size["uniform"].mean() > 0.05
    torch.testing.assert_close(out["auto"], out["uniform" if norm == "linf" else "normal"])


def test_defaults_and_the_paper_configs_follow_the_reference():
    t = TrainingConfig()
    assert (t.trades_forward, t.trades_attack_bn, t.trades_start) == ("separate", "batch", "auto")
    for name in ("cifar10_edm1m.yaml", "cifar10_edm1m_l2.yaml"):
        cfg = load_config(os.path.join(CONFIGS, name))
        for t in (cfg.training, cfg.margin_model.train):
            assert (t.trades_forward, t.trades_attack_bn) == ("separate", "batch"), name


# --------------------------------------------------------------------------------------------
# Two forwards before one backward through DDP (as train_step does on several workers).


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _net()
        ddp = nn.parallel.DistributedDataParallel(model)
        x, x_adv, y = _batch(seed=10 + rank)
        for _ in range(2):  # a second iteration: the reducer's state carries over correctly
            model.zero_grad()
            _loss(ddp, x, x_adv, y, "separate")[0].backward()
        torch.save([p.grad for p in model.parameters()], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~1 min on a loaded 2-core machine
def test_separate_forwards_through_ddp_average_the_local_gradients(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grads")
    mp.start_processes(_ddp_worker, args=(2, port, out), nprocs=2, start_method="spawn")
    local = []
    for rank in range(2):
        model = _net()
        x, x_adv, y = _batch(seed=10 + rank)
        _loss(model, x, x_adv, y, "separate")[0].backward()
        local.append(_grads(model))
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        for g, a, b in zip(got, *local, strict=True):
            torch.testing.assert_close(g, (a + b) / 2, rtol=1e-5, atol=1e-6)
