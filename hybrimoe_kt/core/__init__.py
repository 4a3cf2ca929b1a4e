"""Decision core: routing in, Plan out.

numpy only; importing this package (or any module under it) must never import torch.
"""

from __future__ import annotations

from hybrimoe_kt.core.types import ExpertId, LayerRouting, Plan, Split

__all__ = ["ExpertId", "LayerRouting", "Plan", "Split"]
