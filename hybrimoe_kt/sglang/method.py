"""The MoE method the plugin installs: sglang-kt's ``KTEPWrapperMethod`` with our decisions around it.

It keeps ``_quant_wrapper_id = "kt_ep"``, so the host's checks (``is_wrapped_method(m, "kt_ep")`` in
the weight loader and the model files) still see kt's wrapper; every attribute it does not define is
read from and written to the wrapped method, so loading, ``create_weights``, ``submit``/``sync`` and
the weight loader's mask lookups are kt's own. ``apply`` hands the layer call to the model's
coordinator, which rewrites this layer's GPU experts and masks (prefill) or records the routing
(decode) and then calls kt's ``apply``.
"""

from __future__ import annotations

from typing import Any

_OWN = frozenset({"inner", "coordinator", "layer_id"})


class HybriMoEMethod:
    _quant_wrapper_id = "kt_ep"

    def __init__(self, inner: Any, coordinator: Any, layer_id: int) -> None:
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "coordinator", coordinator)
        object.__setattr__(self, "layer_id", layer_id)

    def __getattr__(self, name: str) -> Any:
        if name in _OWN:  # not set yet (e.g. during unpickling): no recursion into the wrapped method
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def apply(self, layer: Any, dispatch_output: Any) -> Any:
        return self.coordinator.on_layer(self.layer_id, layer, dispatch_output, self.inner.apply)

    def __repr__(self) -> str:
        return f"HybriMoEMethod(layer {self.layer_id}, {type(self.inner).__name__})"
