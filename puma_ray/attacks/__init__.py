"""Adversarial attacks as pure tensor functions (no Ray, no I/O)."""

from puma_ray.attacks.autoattack import AutoAttackResult, autoattack
from puma_ray.attacks.deepfool import DeepFoolResult, deepfool, fuse_conv_bn

__all__ = ["AutoAttackResult", "DeepFoolResult", "autoattack", "deepfool", "fuse_conv_bn"]
