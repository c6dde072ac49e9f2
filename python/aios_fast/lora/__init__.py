"""LoRA adapters on live torch models: the per-layer wrapper and :class:`LoRAManager`."""

from .layer import LoRALayer, base_only, dispatch_conv1d, dispatch_linear
from .manager import LoRAManager
from .random import linear_shapes, random_card

__all__ = ["LoRAManager", "LoRALayer", "base_only", "dispatch_linear", "dispatch_conv1d", "linear_shapes",
           "random_card"]
