"""The two tiers' primitives, shared by every path of ``HybridMoE``: submitting the CPU experts, the
GPU experts' output buffer, and the sum of the tiers (one rounding, on the input's device)."""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch

from hybrimoe_kt.kernels.cpu_backend import CpuExpertBackend
from hybrimoe_kt.runtime.device import Tier
from hybrimoe_kt.runtime.routing_io import ToHost


class Tiers:
    def __init__(self, tier: Tier, backends: Sequence[CpuExpertBackend], hidden: int, to_host: ToHost,
                 real: Callable[[], contextlib.AbstractContextManager]) -> None:
        self.tier, self.cpu, self.hidden = tier, list(backends), hidden
        self._to_host, self._real = to_host, real
        self._tier_cpu = tier.device.type == "cpu"  # the CPU stand-in: no device moves
        self._out_bufs: dict[int, torch.Tensor] = {}  # rows -> GPU experts' fp32 output buffer

    def out_buffer(self, n: int) -> torch.Tensor:
        """An fp32 ``[n, H]`` buffer on the tier's device for the GPU experts, reused across calls (the
        kernels overwrite it; every reader is ordered after them on the same stream)."""
        buf = self._out_bufs.get(n)
        if buf is None:
            # a normal tensor even when first asked for under inference mode, so that it can be written
            # under either mode later (the server decodes in inference mode, chat under no_grad)
            with torch.inference_mode(False):
                buf = self._out_bufs[n] = torch.empty(n, self.hidden, dtype=torch.float32, device=self.tier.device)
        return buf

    def submit_cpu(self, layer: int, x: torch.Tensor, ids_cpu: torch.Tensor, w_cpu: torch.Tensor) -> torch.Tensor:
        """Submit the CPU experts (asynchronous); the backend's mask must already hold the GPU's."""
        x_cpu = self._to_host(x, torch.bfloat16).contiguous()
        with self._real():
            cpu_out = torch.empty(x.shape[0], self.hidden, dtype=torch.bfloat16)
            self.cpu[layer].submit(x_cpu, ids_cpu, w_cpu, cpu_out)
        return cpu_out

    def combine(self, layer: int, x: torch.Tensor, has_cpu: bool, has_gpu: bool,
                 cpu_out: Optional[torch.Tensor], out: Optional[torch.Tensor],
                 shared_out: Optional[torch.Tensor]) -> torch.Tensor:
        """Wait for the CPU tier and sum the tiers; the result on x's device, in x's dtype."""
        dev = self.tier.device
        if has_cpu and not has_gpu and shared_out is None:
            with self._real():
                self.cpu[layer].sync()  # CPU tier only: its output is the result
            result = cpu_out.to(dev, x.dtype)
        elif out is None and shared_out is not None and has_cpu and self._tier_cpu and x.dtype is torch.bfloat16:
            with self._real():
                self.cpu[layer].sync()
            return cpu_out.add_(shared_out)  # CPU experts + shared: one fp32 sum, rounded once
        else:
            if out is None:  # no GPU expert: start from zeros
                out = torch.zeros(x.shape[0], self.hidden, dtype=torch.float32, device=dev)
            if shared_out is not None:
                out.add_(shared_out)  # fp32
            if has_cpu:
                with self._real():
                    self.cpu[layer].sync()
                if self._tier_cpu and x.dtype is torch.bfloat16:
                    return cpu_out.add_(out)  # the fp32 sum, rounded once to bf16, in the CPU buffer
                out.add_(cpu_out if self._tier_cpu else cpu_out.to(dev))
            result = out.to(x.dtype) if x.dtype is not torch.float32 else out.clone()  # out may be reused
        if self._tier_cpu and not x.is_cuda:
            return result
        return result.to(x.device)  # on the input's device (no-op when the tier's device is x's)
