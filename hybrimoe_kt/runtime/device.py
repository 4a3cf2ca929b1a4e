"""Streams and events for the GPU tier, with a CPU stand-in that keeps the same call sequence.

On CUDA, ``Tier`` wraps a dedicated copy stream and ``torch.cuda.Event``s. On the CPU stand-in every
operation is synchronous, so an event is complete once recorded; ``StandInEvent`` still checks the
order of use (waiting on an event that was never recorded is a bug the tests must catch) and counts
records and waits so tests can see that the synchronisation calls happen.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Union

import torch


class StandInEvent:
    """An event on the CPU stand-in: complete when recorded."""

    records = 0
    waits = 0

    def __init__(self) -> None:
        self.recorded = False

    def record(self, stream: object = None) -> None:
        self.recorded = True
        StandInEvent.records += 1

    def wait(self, stream: object = None) -> None:
        if not self.recorded:
            raise RuntimeError("waited on an event that was never recorded (ordering bug)")
        StandInEvent.waits += 1

    def query(self) -> bool:
        return self.recorded

    def synchronize(self) -> None:
        self.wait()


Event = Union[StandInEvent, "torch.cuda.Event"]


def fake_mode_active() -> bool:
    """True while a ``FakeTensorMode`` is active (CI's device-placement checks without a GPU)."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode() is not None


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """``device`` with a CUDA index filled in (``cuda`` -> ``cuda:<current>``, ``cuda:0`` without CUDA,
    as fake CUDA tensors need one), so that every module and tensor compares equal on it."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return dev


@contextmanager
def real_host() -> Iterator[None]:
    """Host-side work (CPU expert kernels, their buffers) on real tensors even under FakeTensorMode:
    the kernels need real pointers. A no-op outside fake mode."""
    if not fake_mode_active():
        yield
        return
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        yield


class Tier:
    """The GPU tier's device with its compute stream and one copy stream."""

    def __init__(self, device: Union[str, torch.device]) -> None:
        self.device = resolve_device(device)
        # fake CUDA (FakeTensorMode without a GPU, CI's placement checks): tensors on a fake cuda
        # device, streams and events by the stand-in
        self.is_fake = self.device.type == "cuda" and not torch.cuda.is_available() and fake_mode_active()
        self.is_cuda = self.device.type == "cuda" and not self.is_fake
        if self.is_fake:
            self.copy_stream: Optional[torch.cuda.Stream] = None
        elif self.is_cuda:
            if not torch.cuda.is_available():
                raise ValueError(f"device {self.device} requested but CUDA is not available; "
                                 f"use device 'cpu' (the CPU stand-in)")
            self.copy_stream = torch.cuda.Stream(self.device)
        elif self.device.type == "cpu":
            self.copy_stream = None
        else:
            raise ValueError(f"unsupported GPU tier device {self.device}; use 'cuda[:N]' or 'cpu'")

    @property
    def label(self) -> str:
        """How results must describe this tier."""
        if self.is_cuda:
            return f"GPU ({torch.cuda.get_device_name(self.device)})"
        if self.is_fake:
            return f"fake {self.device} (FakeTensorMode, no GPU: placement checks only)"
        return "CPU stand-in for the GPU tier (device cpu)"

    def event(self) -> Event:
        return torch.cuda.Event() if self.is_cuda else StandInEvent()

    def record_on_compute(self) -> Event:
        ev = self.event()
        ev.record(torch.cuda.current_stream(self.device) if self.is_cuda else None)
        return ev

    @contextmanager
    def copying(self) -> Iterator[None]:
        """Run the enclosed copies on the copy stream (no-op on the stand-in)."""
        if self.copy_stream is None:
            yield
            return
        with torch.cuda.stream(self.copy_stream):
            yield

    def wait_on_copy_stream(self, ev: Event) -> None:
        """Make the copy stream wait for ``ev`` (e.g. the last compute reading a slot)."""
        ev.wait(self.copy_stream)

    def wait_on_compute(self, ev: Event) -> None:
        """Make the compute stream wait for ``ev`` (e.g. a slot's copy)."""
        ev.wait(torch.cuda.current_stream(self.device) if self.is_cuda else None)

    def record_on_copy(self) -> Event:
        ev = self.event()
        ev.record(self.copy_stream)
        return ev

    def pin_ok(self) -> bool:
        """Pinned host memory needs CUDA; the stand-in uses pageable memory."""
        return self.is_cuda
