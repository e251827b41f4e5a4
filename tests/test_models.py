"""Models and checkpoints: every architecture trains in pixel space, checkpoints round-trip."""

import os

import pytest
import torch
from torch import nn

from puma_ray.errors import CheckpointError, ConfigError
from puma_ray.models import (
    check_compatible,
    create_model,
    list_models,
    load_checkpoint,
    model_fingerprint,
    read_checkpoint_meta,
    save_checkpoint,
)

# Batch per model, small where a model costs seconds on two CPU cores. wrn34_10 and wrn70_16 are
# the wrn28_10 code at other sizes, so for them only the parameter count is checked.
BATCH = {"small_cnn": 8, "preact_resnet18": 2, "wide_resnet": 2, "wrn28_10": 2}
KWARGS = {"wide_resnet": {"depth": 10, "width": 2, "activation": "swish", "dropout": 0.3}}
PARAMS = {  # millions, as reported by the papers' code
    "preact_resnet18": 11.17,
    "wrn28_10": 36.48,
    "wrn34_10": 46.16,
    "wrn70_16": 266.8,
}


def test_every_model_is_tested():
    assert set(list_models()) <= set(BATCH) | set(PARAMS)


def test_registry_has_the_design_models():
    names = list_models()
    for name in ("small_cnn", "preact_resnet18", "wide_resnet", "wrn28_10", "wrn34_10", "wrn70_16"):
        assert name in names
    assert names == sorted(names)


@pytest.mark.parametrize("name", [n for n in list_models() if n in BATCH])
def test_forward_backward_in_pixel_space(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, **KWARGS.get(name, {}))
    assert model.arch == name and model.num_classes == 7
    assert model.model_kwargs == KWARGS.get(name, {})
    n = BATCH[name]
    x = torch.rand(n, 3, 32, 32, requires_grad=True)
    logits = model(x)
    assert logits.shape == (n, 7)
    logits.logsumexp(dim=1).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (n, model.num_features)
        assert torch.allclose(model.classifier(feats), model(x), atol=1e-5)


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_counts(name):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = create_model(name, num_classes=10)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert params == pytest.approx(PARAMS[name], rel=0.005)


def test_small_cnn_is_small():
    model = create_model("small_cnn", num_classes=10)
    params = sum(p.numel() for p in model.parameters())
    assert 300_000 <= params <= 600_000
    assert model.num_features == 256


def test_small_cnn_width():
    """`width` scales the conv channels; the default is the demo's (and the packaged margin
    model's) network, key for key and shape for shape."""
    default = create_model("small_cnn", num_classes=10)
    same = create_model("small_cnn", num_classes=10, width=32)
    assert {k: v.shape for k, v in default.state_dict().items()} == {
        k: v.shape for k, v in same.state_dict().items()
    }
    narrow = create_model("small_cnn", num_classes=10, width=16)
    assert narrow.state_dict().keys() == default.state_dict().keys()
    assert narrow.body[0].out_channels == 16 and narrow.body[-2].in_features == 2 * 16 * 16
    assert narrow(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    narrow_params = sum(p.numel() for p in narrow.parameters())
    assert narrow_params < sum(p.numel() for p in default.parameters()) / 2


def test_normalisation_is_inside_the_model():
    model = create_model("small_cnn", num_classes=3, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    buffers = dict(model.named_buffers())
    assert torch.equal(buffers["normalize.mean"].flatten(), torch.full((3,), 0.5))
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(model.normalize(x), (x - 0.5) / 0.25)
    default = create_model("small_cnn", num_classes=3)
    assert default.normalize.mean.flatten()[0].item() == pytest.approx(0.4914)


def test_grayscale_and_other_sizes():
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    wrn = create_model("wide_resnet", num_classes=4, depth=10, width=1, in_channels=1)
    assert wrn(torch.rand(2, 1, 28, 28)).shape == (2, 4)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("resnet9000", {}, r"unknown model 'resnet9000'; available: preact_resnet18, small_cnn"),
        ("small_cnn", {"widht": 2}, r"model 'small_cnn' has no option 'widht'; options: "),
        ("wrn28_10", {"depth": 34}, r"has no option 'depth'"),
        ("wide_resnet", {"depth": 30}, r"model 'wide_resnet': option 'depth' must be 6n \+ 4"),
        ("wide_resnet", {"width": 0}, r"option 'width'"),
        ("wide_resnet", {"activation": "tanh"}, r"option 'activation' must be one of relu"),
        ("preact_resnet18", {"activation": "gelu"}, r"option 'activation'"),
        ("wide_resnet", {"dropout": 1.5}, r"option 'dropout'"),
        ("small_cnn", {"mean": [0.5, 0.5]}, r"option 'mean' must be 3 numbers"),
        ("small_cnn", {"std": [1, 0, 1]}, r"option 'std' must be 3 positive numbers"),
        ("small_cnn", {"in_channels": 0}, r"option 'in_channels'"),
        ("small_cnn", {"width": 0}, r"model 'small_cnn': option 'width' must be a positive"),
    ],
)
def test_create_model_errors(name, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        create_model(name, num_classes=10, **kwargs)


def test_num_classes_must_be_positive():
    with pytest.raises(ConfigError, match="num_classes must be a positive integer, got 0"):
        create_model("small_cnn", num_classes=0)


def _trained_small_cnn(num_classes=10, **kwargs):
    """One SGD step in train mode, so weights and BN running statistics differ from init."""
    torch.manual_seed(1)
    model = create_model("small_cnn", num_classes=num_classes, **kwargs)
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, num_classes, (16,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    return model.eval()


def test_checkpoint_round_trip(tmp_path):
    model = _trained_small_cnn(mean=[0.5, 0.5, 0.5])
    path = str(tmp_path / "run" / "model.pt")
    save_checkpoint(path, model, extra={"epoch": 3, "metrics": {"clean_acc": 0.5}})
    assert os.listdir(tmp_path / "run") == ["model.pt"]  # no temporary file left behind

    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert meta["path"] == path and meta["arch"] == "small_cnn" and meta["num_classes"] == 10
    assert meta["kwargs"] == {"mean": [0.5, 0.5, 0.5]}
    assert meta["image_shape"] == [32, 32, 3]
    assert meta["extra"] == {"epoch": 3, "metrics": {"clean_acc": 0.5}}
    assert read_checkpoint_meta(path) == meta

    raw = torch.load(path, weights_only=True)  # no pickled code needed to open it
    assert raw["format"] == "puma_ray.checkpoint/1"
    assert set(raw) == {
        "format",
        "arch",
        "num_classes",
        "kwargs",
        "image_shape",
        "extra",
        "state_dict",
    }


def test_checkpoint_rebuilds_model_options(tmp_path):
    torch.manual_seed(0)
    model = create_model("wide_resnet", num_classes=5, depth=10, width=1, activation="silu").eval()
    path = tmp_path / "wrn.pt"
    save_checkpoint(path, model, image_shape=(28, 28, 3))
    loaded, meta = load_checkpoint(path)
    assert meta["kwargs"] == {"depth": 10, "width": 1, "activation": "silu"}
    assert meta["image_shape"] == [28, 28, 3]
    assert isinstance(loaded.act, nn.SiLU)
    x = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_file_uri(tmp_path):
    model = _trained_small_cnn()
    uri = f"file://{tmp_path}/model.pt"
    save_checkpoint(uri, model)
    loaded, meta = load_checkpoint(uri)
    assert meta["path"] == uri
    assert model_fingerprint(uri) == model_fingerprint(tmp_path / "model.pt")


def test_check_compatible(tmp_path):
    path = str(tmp_path / "five.pt")
    save_checkpoint(path, create_model("small_cnn", num_classes=5))
    meta = read_checkpoint_meta(path)
    check_compatible(meta, 5, (32, 32, 3))
    classes = f"^{path}: model has 5 classes but the dataset has 10$"
    with pytest.raises(CheckpointError, match=classes):
        check_compatible(meta, 10, (32, 32, 3))
    shape = f"^{path}: model was trained on 32x32x3 images but the dataset's are 28x28x1$"
    with pytest.raises(CheckpointError, match=shape):
        check_compatible(meta, 5, (28, 28, 1))
    both = "5 classes but the dataset has 10; model was trained on 32x32x3"
    with pytest.raises(CheckpointError, match=both):
        check_compatible(meta, 10, (64, 64, 3))


def test_fingerprint(tmp_path):
    model = _trained_small_cnn()
    a, b, c = (str(tmp_path / f"{n}.pt") for n in "abc")
    save_checkpoint(a, model)
    save_checkpoint(b, model, extra={"epoch": 9})  # extra is not part of the model's identity
    fp = model_fingerprint(a)
    assert len(fp) == 32 and int(fp, 16) >= 0
    assert model_fingerprint(b) == fp
    with torch.no_grad():
        model.classifier.bias[0] += 1e-3
    save_checkpoint(c, model)
    assert model_fingerprint(c) != fp


def test_missing_and_corrupt_files(tmp_path):
    missing = str(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=f"^{missing}: checkpoint not found$"):
        load_checkpoint(missing)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_checkpoint_meta(missing)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    truncated = tmp_path / "truncated.pt"
    save_checkpoint(truncated, create_model("small_cnn", num_classes=10))
    truncated.write_bytes(truncated.read_bytes()[:5000])
    bare = tmp_path / "bare_state_dict.pt"
    torch.save(create_model("small_cnn", num_classes=10).state_dict(), bare)
    pickled = tmp_path / "pickled_module.pt"
    torch.save(nn.Linear(2, 2), pickled)  # refused by weights_only loading
    for path in (garbage, truncated, bare, pickled):
        for read in (load_checkpoint, read_checkpoint_meta, model_fingerprint):
            with pytest.raises(CheckpointError, match=f"^{path}: not a puma_ray checkpoint \\("):
                read(path)


def test_weights_that_do_not_fit(tmp_path):
    path = tmp_path / "edited.pt"
    save_checkpoint(path, create_model("small_cnn", num_classes=10))
    raw = torch.load(path, weights_only=True)
    raw["num_classes"] = 4
    torch.save(raw, path)
    fit = r"weights do not fit small_cnn \(classifier.weight is \[10, 256\] in the file but \[4,"
    with pytest.raises(CheckpointError, match=fit):
        load_checkpoint(path)
    raw["arch"], raw["num_classes"] = "nonexistent", 10
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="cannot rebuild its model .unknown model"):
        load_checkpoint(path)


def test_wrapper_prefixes_are_stripped(tmp_path):
    model = _trained_small_cnn()
    wrapped = nn.DataParallel(model)  # same `module.` prefix as DistributedDataParallel
    assert next(iter(wrapped.state_dict())).startswith("module.")
    path = tmp_path / "ddp.pt"
    save_checkpoint(path, wrapped)
    raw = torch.load(path, weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in raw["state_dict"])
    assert raw["arch"] == "small_cnn"
    loaded, _ = load_checkpoint(path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    # Checkpoints written by other tools with prefixes still load.
    raw["state_dict"] = {f"_orig_mod.module.{k}": v for k, v in raw["state_dict"].items()}
    torch.save(raw, path)
    load_checkpoint(path)


def test_save_refuses_what_weights_only_cannot_load(tmp_path):
    import numpy as np

    model = create_model("small_cnn", num_classes=10)
    with pytest.raises(TypeError, match=r"extra\['acc'\] is a float64"):
        save_checkpoint(tmp_path / "x.pt", model, extra={"acc": np.float64(0.5)})
    with pytest.raises(ValueError, match="built by create_model"):
        save_checkpoint(tmp_path / "x.pt", nn.Linear(2, 2))
    assert not os.listdir(tmp_path)
