"""Tiny operators for the rule-engine tests: they follow the operator contract and wrap the module
they replace, so a test can see what the engine passed in."""

from __future__ import annotations

from typing import Any

import torch


class Wrap(torch.nn.Module):
    """Explicit signature without **kwargs: accepts only ``tag`` besides the contract."""

    def __init__(self, key: str, gguf_loader: Any, config: Any, orig_module: torch.nn.Module,
                 prefill_device: str = "cpu", generate_device: str = "cpu", tag: str = "") -> None:
        super().__init__()
        self.key = key
        self.gguf_loader = gguf_loader
        self.config = config
        self.orig_module = orig_module
        self.prefill_device = prefill_device
        self.generate_device = generate_device
        self.tag = tag

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.orig_module(*args, **kwargs)


class Declared(Wrap):
    """Forwards **kwargs but declares the names it accepts."""

    KWARGS = frozenset({"tag", "slots"})

    def __init__(self, key: str, gguf_loader: Any, config: Any, orig_module: torch.nn.Module,
                 prefill_device: str = "cpu", generate_device: str = "cpu", **kwargs: Any) -> None:
        self.slots = kwargs.pop("slots", 0)
        super().__init__(key, gguf_loader, config, orig_module, prefill_device, generate_device,
                         **kwargs)


class NeedsSlots(Wrap):
    """A required extra kwarg (no default)."""

    def __init__(self, key: str, gguf_loader: Any, config: Any, orig_module: torch.nn.Module,
                 prefill_device: str, generate_device: str, slots: int) -> None:
        super().__init__(key, gguf_loader, config, orig_module, prefill_device, generate_device)
        self.slots = slots


class Fails(Wrap):
    """Construction fails when ``key`` ends with ``fail_on``."""

    def __init__(self, key: str, gguf_loader: Any, config: Any, orig_module: torch.nn.Module,
                 prefill_device: str = "cpu", generate_device: str = "cpu", fail_on: str = "") -> None:
        if fail_on and key.endswith(fail_on):
            raise RuntimeError(f"cannot build {key}")
        super().__init__(key, gguf_loader, config, orig_module, prefill_device, generate_device)


class NoContract(torch.nn.Module):
    """Breaks the contract: no orig_module / device parameters."""

    def __init__(self, key: str) -> None:
        super().__init__()


class NotAModule:
    """Follows the contract's signature but is not an nn.Module."""

    def __init__(self, key: str, gguf_loader: Any, config: Any, orig_module: Any,
                 prefill_device: str = "cpu", generate_device: str = "cpu") -> None:
        pass


def path(cls: type) -> str:
    """Dotted path of a class defined here, as the rules must spell it under this test layout."""
    return f"{cls.__module__}.{cls.__qualname__}"
