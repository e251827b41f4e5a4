"""The builtin dataset: procedural 10-class 32x32x3 images, the embedded default.

Every sample is a pure function of (seed, part, index): a counter-based hash (the splitmix64
finaliser on uint64 arrays) gives each row its own random stream, so any shard can be generated
alone, in any chunking, in parallel Ray tasks, and the bytes are always the same. Generation is
vectorised numpy over chunks of rows (no per-row Python).

What a sample is (all sizes in pixels, intensities in [0, 255]):
- a shape whose *kind* is the class (disk, ring, square, frame, ...), at a random position, size
  and aspect ratio, in a random colour at a random (sometimes low) contrast against a random
  background with a random linear gradient: the robust, large-amplitude class feature;
- a faint class-specific grating (orientation and period set by the class, random phase) of
  amplitude 5/255: a non-robust feature, below a usual 8/255 L-inf budget, which standard
  training uses and adversarial training must give up -- so robustness visibly costs clean
  accuracy, as on natural images;
- Gaussian pixel noise of std `noise` (config, in [0, 1] pixel units), so classes overlap.

Parts: `train` and `test` (source `real`) follow that distribution. `synthetic` is the same
generator made deliberately imperfect, as diffusion-generated data is: an `ambiguous_fraction`
of its samples blends two classes' images (weight 0.5-0.7 on the labelled one), and a
`mislabeled_fraction` carries a uniformly wrong label. `synthetic_flags` recomputes which ones.

What it is not: natural images. Absolute accuracies do not transfer to CIFAR; it exists so the
whole pipeline runs, and margins behave meaningfully, in minutes on a laptop CPU.
See docs/data.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np

from puma_ray.config import BuiltinSource

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
CLASS_NAMES = (
    "disk",
    "ring",
    "square",
    "frame",
    "diamond",
    "triangle",
    "plus",
    "cross",
    "hbar",
    "vbar",
)
Part = Literal["train", "synthetic", "test"]
PARTS: tuple[Part, ...] = ("train", "synthetic", "test")
# Each part has its own id block, so resizing one part never changes another part's ids.
PART_ID_BLOCK = {"train": 0, "synthetic": 2**38, "test": 2**39}
PART_SOURCE = {"train": "real", "synthetic": "synthetic", "test": "real"}

# Generator constants (pixels unless noted; intensities in [0, 255]).
SPEC = {
    "centre_jitter": 5.0,  # shape centre = image centre + U[-j, j] per axis
    "radius": (5.0, 10.0),  # shape half-size
    "aspect": 0.2,  # width/height = 1 + U[-a, a]
    "background": (50.0, 205.0),  # per-channel background level
    "gradient": 30.0,  # background ramp: U[-g, g] per axis across the image
    "contrast": (25.0, 115.0),  # |shape - background| luminance, random sign
    "tint": (0.6, 1.4),  # per-channel factor on the contrast (shape colour)
    "texture_amplitude": 5.0,  # class grating, below an 8/255 L-inf budget
    "texture_phases": 8,  # random phase drawn from this many
    "blend": (0.5, 0.7),  # ambiguous synthetic: weight of the labelled class's image
}
CHUNK_ROWS = 512  # rows per vectorised step: ~6 MB float32 working set, stays in cache

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_PART_SALT = {"train": 0x1F0A, "synthetic": 0x5E17, "test": 0x7E57}
_SECOND_IMAGE_SALT = np.uint64(0xA5A5_5A5A_C3C3_3C3C)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (Steele et al. 2014), vectorised; returns a new uint64 array."""
    z = z ^ (z >> np.uint64(30))
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def _row_keys(seed: int, part: Part, index: np.ndarray) -> np.ndarray:
    base = _mix(np.array([(seed ^ (_PART_SALT[part] << 48)) & _MASK], np.uint64))
    return _mix(base + np.asarray(index, np.uint64) * np.uint64(_GOLDEN))


def _uniform(keys: np.ndarray, stream: int) -> np.ndarray:
    """Row-wise U[0, 1) float64 from stream `stream` of each row's key."""
    salt = np.uint64((stream + 1) * 0xD1B54A32D192ED03 & _MASK)
    return (_mix(keys + salt) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _between(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return lo + (hi - lo) * u


# Noise: one hashed byte per pixel mapped through the Gaussian quantile function (a 256-level
# quantised normal), so no transcendental runs per pixel and results are bitwise portable.
_GAUSS = np.array([NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)], np.float32)
_NOISE_WORDS = int(np.prod(IMAGE_SHAPE)) // 8
_NOISE_COUNTERS = (np.arange(1, _NOISE_WORDS + 1, dtype=np.uint64) + np.uint64(1 << 32)) * (
    np.uint64(_GOLDEN)
)

_YY, _XX = np.mgrid[0:32, 0:32].astype(np.float32) + np.float32(0.5)


def _texture_bank() -> np.ndarray:
    """[class, phase, 32, 32] float32 gratings; rounded to 1/4096 so libm differences between
    machines cannot change a pixel."""
    k = SPEC["texture_phases"]
    c = np.arange(NUM_CLASSES)[:, None, None, None]
    theta = np.pi * (c + 0.5) / NUM_CLASSES
    period = 3.0 + 0.5 * (c % 3)
    phase = 2 * np.pi * np.arange(k)[None, :, None, None] / k
    y, x = np.mgrid[0:32, 0:32].astype(np.float64)
    wave = np.sin(2 * np.pi * (x * np.cos(theta) + y * np.sin(theta)) / period + phase)
    return (np.round(wave * SPEC["texture_amplitude"] * 4096) / 4096).astype(np.float32)


_TEXTURE = _texture_bank()
_TRIANGLE = [(np.cos(a), np.sin(a)) for a in np.pi / 2 + 2 * np.pi * np.arange(3) / 3]


def _shape(cls: int, dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, float]:
    """Normalised distance f (< 1 inside the shape) and its edge scale, for class `cls`."""
    ax, ay = np.abs(dx), np.abs(dy)
    if cls == 0:  # disk
        return np.sqrt(dx * dx + dy * dy), 1.0
    if cls == 1:  # ring
        return np.abs(np.sqrt(dx * dx + dy * dy) - 0.72) / 0.28, 0.28
    if cls == 2:  # square
        return np.maximum(ax, ay) / 0.85, 0.85
    if cls == 3:  # frame
        return np.abs(np.maximum(ax, ay) - 0.62) / 0.24, 0.24
    if cls == 4:  # diamond
        return (ax + ay) / 1.1, 0.78
    if cls == 5:  # triangle (inradius 0.5)
        f = np.maximum(_TRIANGLE[0][0] * dx + _TRIANGLE[0][1] * dy, 0)
        for nx, ny in _TRIANGLE[1:]:
            np.maximum(f, nx * dx + ny * dy, out=f)
        return f / 0.5, 0.5
    if cls in (6, 7):  # plus, or a plus rotated by 45 degrees
        if cls == 7:
            ax, ay = np.abs(dx + dy) * np.float32(0.7071), np.abs(dx - dy) * np.float32(0.7071)
        return np.minimum(np.maximum(ax / 0.3, ay), np.maximum(ay / 0.3, ax)), 0.3
    if cls == 8:  # horizontal bar
        return np.maximum(ax, ay / 0.33), 0.33
    return np.maximum(ax / 0.33, ay), 0.33  # vertical bar


def _render(keys: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Noise-free images, float32 [n, 32, 32, 3] in [0, 255] units (+0.5 for rounding)."""
    n = len(keys)
    u = [_uniform(keys, s).astype(np.float32) for s in range(14)]
    cx = 16 + _between(u[0], -1, 1) * SPEC["centre_jitter"]
    cy = 16 + _between(u[1], -1, 1) * SPEC["centre_jitter"]
    radius = _between(u[2], *SPEC["radius"])
    # Only correctly rounded operations (+ - * / sqrt) touch per-row or per-pixel values, so the
    # bytes do not depend on SIMD paths, chunk sizes or the machine.
    aspect = 1 + _between(u[3], -1, 1) * np.float32(SPEC["aspect"])
    inv_rx = (1 / (radius * aspect))[:, None, None]
    inv_ry = (aspect / radius)[:, None, None]
    background = np.stack([_between(u[i], *SPEC["background"]) for i in (4, 5, 6)], 1)
    sign = np.where(u[7] < 0.5, np.float32(-1), np.float32(1))
    contrast = _between(u[8], *SPEC["contrast"]) * sign
    delta = np.stack([_between(u[i], *SPEC["tint"]) for i in (9, 10, 11)], 1) * contrast[:, None]
    gx = _between(u[12], -1, 1) * (SPEC["gradient"] / 32)
    gy = _between(u[13], -1, 1) * (SPEC["gradient"] / 32)
    phase = (_uniform(keys, 14) * SPEC["texture_phases"]).astype(np.int64)

    alpha = np.empty((n, 32, 32), np.float32)
    for cls in np.unique(classes):
        rows = np.flatnonzero(classes == cls)
        dx = (_XX - cx[rows, None, None]) * inv_rx[rows]
        dy = (_YY - cy[rows, None, None]) * inv_ry[rows]
        f, edge = _shape(int(cls), dx, dy)
        a = (1 - f) * (radius[rows, None, None] * np.float32(edge))
        a += 0.5
        alpha[rows] = np.clip(a, 0, 1, out=a)
    lum = _TEXTURE[classes, phase]  # [n, 32, 32], a fresh array from fancy indexing
    lum += (_XX - 16) * gx[:, None, None]
    lum += (_YY - 16) * gy[:, None, None]
    lum += 0.5  # so truncation to uint8 rounds to nearest
    img = alpha[..., None] * delta[:, None, None, :]
    img += background[:, None, None, :]
    img += lum[..., None]
    return img


@dataclass
class SyntheticFlags:
    """Per-row ground truth of the generator's imperfections (the data stores only `label`)."""

    true_label: np.ndarray  # int64 [n]: the class the image was drawn from (the dominant one)
    label: np.ndarray  # int64 [n]: the stored label (differs where mislabeled)
    ambiguous: np.ndarray  # bool [n]: blended with a second class
    second_label: np.ndarray  # int64 [n]: the blended-in class (== true_label if not ambiguous)
    mislabeled: np.ndarray  # bool [n]


def _labels(src: BuiltinSource, part: Part, keys: np.ndarray) -> SyntheticFlags:
    true = (_uniform(keys, 20) * NUM_CLASSES).astype(np.int64)
    n = len(keys)
    if part != "synthetic":
        no = np.zeros(n, bool)
        return SyntheticFlags(true, true, no, true, no)
    ambiguous = _uniform(keys, 21) < src.ambiguous_fraction
    other = (true + 1 + (_uniform(keys, 22) * (NUM_CLASSES - 1)).astype(np.int64)) % NUM_CLASSES
    mislabeled = _uniform(keys, 23) < src.mislabeled_fraction
    wrong = (true + 1 + (_uniform(keys, 24) * (NUM_CLASSES - 1)).astype(np.int64)) % NUM_CLASSES
    return SyntheticFlags(
        true_label=true,
        label=np.where(mislabeled, wrong, true),
        ambiguous=ambiguous,
        second_label=np.where(ambiguous, other, true),
        mislabeled=mislabeled,
    )


def _check(part: str, index: np.ndarray) -> np.ndarray:
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS} (got {part!r})")
    index = np.asarray(index, np.int64).reshape(-1)
    if len(index) and (index.min() < 0 or index.max() >= 2**38):
        raise ValueError("row index must be in [0, 2**38)")
    return index


def part_size(src: BuiltinSource, part: Part) -> int:
    return {"train": src.real_train, "synthetic": src.synthetic, "test": src.real_test}[part]


def ids(id_offset: int, part: Part, index: np.ndarray) -> np.ndarray:
    """Sample ids: `id_offset + PART_ID_BLOCK[part] + index` (int64)."""
    index = _check(part, index)
    return index + np.int64(id_offset + PART_ID_BLOCK[part])


def synthetic_flags(src: BuiltinSource, part: Part, index: np.ndarray) -> SyntheticFlags:
    """Which rows are ambiguous or mislabeled, and their true classes (cheap: no images)."""
    index = _check(part, index)
    return _labels(src, part, _row_keys(src.seed, part, index))


def generate(src: BuiltinSource, part: Part, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [n, 32, 32, 3] and labels int64 [n] for rows `index` of `part`.

    A pure function of (src.seed, part, index, and the generator settings in `src`): the same
    row gives the same bytes however rows are batched. ~30k rows/s per core.
    """
    index = _check(part, index)
    n = len(index)
    images = np.empty((n, *IMAGE_SHAPE), np.uint8)
    labels = np.empty(n, np.int64)
    scale = np.float32(src.noise * 255)
    for start in range(0, n, CHUNK_ROWS):
        sl = slice(start, min(n, start + CHUNK_ROWS))
        keys = _row_keys(src.seed, part, index[sl])
        flags = _labels(src, part, keys)
        img = _render(keys, flags.true_label)
        amb = np.flatnonzero(flags.ambiguous)
        if len(amb):
            w = _between(_uniform(keys[amb], 25), *SPEC["blend"]).astype(np.float32)
            w = w[:, None, None, None]
            other = _render(keys[amb] ^ _SECOND_IMAGE_SALT, flags.second_label[amb])
            img[amb] = img[amb] * w + other * (1 - w)
        if scale:
            noise_bytes = _mix(keys[:, None] + _NOISE_COUNTERS[None, :]).astype("<u8")
            noise = (_GAUSS * scale)[noise_bytes.view(np.uint8)].reshape(img.shape)
            img += noise
        np.clip(img, 0, 255.5, out=img)
        images[sl] = img  # float32 -> uint8 truncates; the +0.5 in _render makes it round
        labels[sl] = flags.label
    return images, labels
