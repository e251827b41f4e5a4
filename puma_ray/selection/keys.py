"""The 128-bit keys of the exact order and the per-row hashes (pure NumPy).

A key's high 64 bits hold the rank tier (bits 32-33) above the order-preserving bit pattern of
the float32 margin (or a 64-bit hash, for `random`); its low 64 bits the order-preserving
pattern of the int64 id. The hashes are splitmix64 of (seed, salt, id): any shard computes its
rows' keys and subsets alone, on any machine, in any order.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

M64 = (1 << 64) - 1
KEY_END = 1 << 128  # "+inf": every key is below it
SIGN32 = 0x80000000
SIGN64 = 1 << 63
RANDOM_SALT = 0x5052554E45  # "PRUNE": random pruning and the extrapolation subset use
EXTRAPOLATION_SALT = 0x4558545241  # "EXTRA": independent hashes of the same (seed, id)
HOLDOUT_SALT = 0x484F4C44  # "HOLD": the held-out check of the extrapolation
# Rank tiers (key bits 32-33, above the 32 margin bits): a policy moves a non-converged row
# below or above every row of the normal tier, whatever its margin.
TIER_BELOW, TIER_NORMAL, TIER_ABOVE = 0, 1, 2
TIER_NAMES = {TIER_BELOW: "below_converged", TIER_ABOVE: "above_converged"}


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _mix64_int(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def hash_ids(ids: np.ndarray, seed: int, salt: int = RANDOM_SALT) -> np.ndarray:
    """uint64[n]: a splitmix64 hash of (seed, salt, id). Depends on nothing but these three, so
    any shard can compute its rows' keys alone, on any machine, in any order."""
    s = _mix64_int((_mix64_int(seed & M64) ^ salt) & M64)
    x = np.atleast_1d(np.asarray(ids, np.int64)).view(np.uint64)
    return _mix64(x ^ np.uint64(s))


def margin_order_key(margins: np.ndarray) -> np.ndarray:
    """uint64[n] (< 2**32) whose unsigned order is the float order of float32 `margins`.

    -0.0 is mapped to +0.0 so the two tie (as they do in a float sort). NaN is refused by the
    caller: it has no place in an order."""
    m = np.atleast_1d(np.asarray(margins, np.float32)) + np.float32(0.0)  # -0.0 + 0.0 = +0.0
    bits = m.view(np.uint32)
    neg = (bits & np.uint32(SIGN32)) != 0
    return np.where(neg, ~bits, bits | np.uint32(SIGN32)).astype(np.uint64)


def margin_from_order_key(key_hi: int) -> float:
    u = np.uint32(key_hi & 0xFFFFFFFF)  # without the tier bits
    bits = u ^ np.uint32(SIGN32) if u & np.uint32(SIGN32) else ~u
    return float(np.array([bits], np.uint32).view(np.float32)[0])


def id_order_key(ids: np.ndarray) -> np.ndarray:
    """uint64[n] whose unsigned order is the signed order of int64 `ids`."""
    return np.atleast_1d(np.asarray(ids, np.int64)).view(np.uint64) ^ np.uint64(SIGN64)


def row_keys(
    order: str,
    ids: np.ndarray,
    margins: np.ndarray | None,
    seed: int,
    tier: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(hi, lo) uint64 halves of each row's 128-bit key; `order` is 'margin' or 'hash'.
    Margin keys carry the rank tier (default TIER_NORMAL) above the margin bits."""
    lo = id_order_key(ids)
    if order == "margin":
        if margins is None:
            raise ValueError("the margin order needs margins")
        t = np.full(len(lo), TIER_NORMAL, np.uint64) if tier is None else tier.astype(np.uint64)
        return (t << np.uint64(32)) | margin_order_key(margins), lo
    if order == "hash":
        return hash_ids(ids, seed), lo
    raise ValueError(f"unknown order {order!r}")


def describe_key(key: int, order: str) -> dict:
    """A cut key as the manifest shows it: the margin (or hash) and the id of the cut row."""
    hi, lo = key >> 64, key & M64
    v = lo ^ SIGN64
    out = {"id": v - (1 << 64) if v >= SIGN64 else v}
    if order == "margin":
        out = {"margin": margin_from_order_key(hi), **out}
        if (hi >> 32) in TIER_NAMES:
            out["tier"] = TIER_NAMES[hi >> 32]
    else:
        out = {"hash": f"{hi:016x}", **out}
    return out


def keys_below(hi: np.ndarray, lo: np.ndarray, cut: int) -> np.ndarray:
    """bool[n]: key < cut. A cut of 0 selects nothing; KEY_END selects everything."""
    if cut <= 0:
        return np.zeros(len(hi), bool)
    if cut >= KEY_END:
        return np.ones(len(hi), bool)
    c_hi, c_lo = np.uint64(cut >> 64), np.uint64(cut & M64)
    return (hi < c_hi) | ((hi == c_hi) & (lo < c_lo))


def selection_digest(ids: np.ndarray, eps: np.ndarray) -> int:
    """An order-independent fingerprint of a kept set: the sum mod 2**64 of a hash of each kept
    row's (id, float32 eps bits). Shards add their digests, so equal selections made by
    different paths (or shardings) give equal digests."""
    eps_bits = np.atleast_1d(np.asarray(eps, np.float32)).view(np.uint32).astype(np.uint64)
    h = _mix64(np.atleast_1d(np.asarray(ids, np.int64)).view(np.uint64) ^ _mix64(eps_bits))
    return int(h.sum(dtype=np.uint64))


def extrapolation_subset(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """bool[n]: the rows DeepFool scores under `extrapolated` (Nieth et al.): a row is in the
    subset iff hash(seed, id) < fraction * 2**64. Per-row and deterministic, so the scoring stage
    and the prune stage pick the same rows independently; the subset size is binomial around
    fraction * n."""
    return _hash_share(ids, fraction, seed, EXTRAPOLATION_SALT)


def holdout_subset(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """bool[n]: the rows of the extrapolation's held-out check, hash(seed, id) < fraction *
    2**64 with a third salt, so within the scored subset it is an independent ~fraction share.
    They stay reference rows for everyone else; only their own estimate leaves them out."""
    return _hash_share(ids, fraction, seed, HOLDOUT_SALT)


def _hash_share(ids: np.ndarray, fraction: float, seed: int, salt: int) -> np.ndarray:
    ids = np.atleast_1d(np.asarray(ids, np.int64))
    if fraction >= 1:
        return np.ones(len(ids), bool)
    if fraction <= 0:
        return np.zeros(len(ids), bool)
    threshold = int(_exact(fraction) * (1 << 64))
    return hash_ids(ids, seed, salt) < np.uint64(threshold)


def _exact(x: float) -> Fraction:
    """The decimal the user wrote (0.15 -> 3/20), not its binary approximation."""
    return Fraction(repr(float(x)))
