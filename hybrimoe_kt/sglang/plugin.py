"""Registration in sglang-kt's MoE wrapper registry, and the process's coordinator.

``register`` adds the wrapper ``"hybrimoe"`` at priority ``PRIORITY`` (above kt's ``"kt_ep"`` at 20, so
``FusedMoE.__init__`` hands it kt's ``KTEPWrapperMethod`` to wrap). Its predicate answers for layers of
a model served with kt-kernel experts (``--kt-weight-path``) unless the plugin is disabled, with the
settings as context; its factory wraps a kt method in ``HybriMoEMethod`` and returns any other method
unchanged (kt's own predicate declined the layer, e.g. a draft model). One ``ModelCoordinator`` per
process serves every wrapped layer (a TP worker builds one model); the first wrapped layer creates it
and installs the step hook on ``ModelRunner.forward``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from hybrimoe_kt.sglang import host
from hybrimoe_kt.sglang.coordinator import ModelCoordinator
from hybrimoe_kt.sglang.method import HybriMoEMethod
from hybrimoe_kt.sglang.settings import PluginSettings, load_settings

log = logging.getLogger(__name__)

WRAPPER_ID = "hybrimoe"
PRIORITY = 30  # wraps outside kt_ep (20): lower priorities wrap first

_coordinator: Optional[ModelCoordinator] = None  # this process's model (see the module docstring)


def register() -> None:
    host.register(WRAPPER_ID, predicate, factory, PRIORITY)


def predicate(layer: Any, server_args: Any) -> Optional[PluginSettings]:
    if not host.kt_configured(server_args):
        return None
    settings = load_settings()
    return settings if settings.enabled else None


def factory(layer: Any, method: Any, settings: PluginSettings) -> Any:
    if not host.is_kt_method(method):
        return method  # kt did not wrap this layer: nothing to manage
    layer_id = int(method.kt_config.layer_idx)
    if host.dynamic_update(method):
        raise ValueError("hybrimoe manages the GPU experts itself: drop --kt-enable-dynamic-expert-update "
                         "(or set HYBRIMOE_DISABLE=1 to keep kt's dynamic update)")
    coord = coordinator(settings)
    coord.add_layer(layer_id, layer, method)
    return HybriMoEMethod(method, coord, layer_id)


def coordinator(settings: PluginSettings) -> ModelCoordinator:
    """This process's coordinator, created (and the step hook installed) on first use."""
    global _coordinator
    if _coordinator is None:
        _coordinator = ModelCoordinator(settings)
        host.install_step_hook(_coordinator.before_forward)
    elif _coordinator.settings != settings:
        raise ValueError(f"hybrimoe settings changed while the model was being built: {settings} after "
                         f"{_coordinator.settings}")
    return _coordinator


def current() -> Optional[ModelCoordinator]:
    return _coordinator


def reset() -> None:
    """Forget the process's coordinator (a new model is about to be built, e.g. in tests)."""
    global _coordinator
    _coordinator = None
