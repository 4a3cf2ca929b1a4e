"""Cost models: predicted seconds for expert compute on each tier and for a PCIe transfer.

Schedulers, prefetchers and the simulator all price work through the same ``CostModel``, so a policy
is judged by the model it was designed against. ``RooflineCost`` derives the numbers from a hardware
profile and a model preset; ``ReleasedCost`` reproduces the constants hard-coded in the released
HybriMoE scheduler (used to check that ``hss`` behaves like the release).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

from hybrimoe_kt.core.hardware import HardwareProfile
from hybrimoe_kt.core.models import ModelPreset, bits_per_weight


class CostModel(Protocol):
    """Seconds. ``*_call`` is paid once per layer call that puts at least one expert on that tier."""

    cpu_call: float
    gpu_call: float

    def cpu_expert(self, n_tokens: int) -> float: ...
    def gpu_expert(self, n_tokens: int) -> float: ...
    def transfer(self) -> float: ...


@dataclass(frozen=True, slots=True)
class RooflineCost:
    """Per-expert roofline: overhead + max(bytes / bandwidth, flops / throughput), for one model."""

    cpu_call: float
    gpu_call: float
    cpu_fixed: float          # per-expert overhead
    cpu_mem: float            # weight-read time of one expert
    cpu_per_token: float      # compute time per token
    gpu_fixed: float
    gpu_mem: float
    gpu_per_token: float
    transfer_s: float
    # non-MoE work, for the simulator
    attn_mem: float           # attention weight reads per layer on the GPU
    attn_per_token: float
    shared_mem: float         # shared expert(s) per MoE layer on the GPU (0 if none)
    shared_per_token: float
    layer_fixed: float
    extra_mem: float          # dense layers and LM head, once per forward
    extra_per_token: float
    n_extra_layers: int
    copy_dram_share: float    # PCIe bandwidth / host DRAM bandwidth: what a busy copy takes from the CPU
    expert_bytes_cpu: int
    expert_bytes_gpu: int

    @staticmethod
    def build(profile: HardwareProfile, model: ModelPreset, cpu_format: str = "q4_k_m",
              gpu_format: str = "bf16", dense_format: Optional[str] = None,
              expert_bytes: Optional[tuple[int, int]] = None) -> "RooflineCost":
        """``gpu_format``: the routed experts' GPU slots; ``dense_format``: attention, shared experts,
        dense layers and the LM head on the GPU (default: ``gpu_format``); ``expert_bytes``: one expert's
        measured bytes on the host and in a GPU slot (a runtime's store), instead of the formats' sizes."""
        us = 1e-6
        dense_format = dense_format or gpu_format
        b_cpu, b_gpu = expert_bytes or (model.expert_bytes(cpu_format), model.expert_bytes(gpu_format))
        f_tok = model.expert_flops(1)
        cpu, gpu = profile.cpu, profile.gpu
        shared_flops = 2.0 * 3 * model.hidden * model.shared_intermediate
        return RooflineCost(
            cpu_call=cpu.call_overhead_us * us,
            gpu_call=gpu.call_overhead_us * us,
            cpu_fixed=cpu.expert_overhead_us * us,
            cpu_mem=b_cpu / (cpu.mem_bw_gbs * 1e9),
            cpu_per_token=f_tok / (cpu.tflops * 1e12),
            gpu_fixed=gpu.expert_overhead_us * us,
            gpu_mem=b_gpu / (gpu.mem_bw_gbs * 1e9),
            gpu_per_token=f_tok / (gpu.tflops * 1e12),
            transfer_s=profile.pcie.latency_us * us + b_gpu / (profile.pcie.bw_gbs * 1e9),
            attn_mem=model.attn_bytes(dense_format) / (gpu.mem_bw_gbs * 1e9),
            attn_per_token=2.0 * model.attn_params / (gpu.tflops * 1e12),
            shared_mem=model.shared_bytes(dense_format) / (gpu.mem_bw_gbs * 1e9),
            shared_per_token=shared_flops / (gpu.tflops * 1e12),
            layer_fixed=profile.layer_overhead_us * us,
            extra_mem=model.extra_params() * bits_per_weight(dense_format) / 8 / (gpu.mem_bw_gbs * 1e9),
            extra_per_token=2.0 * model.extra_params() / (gpu.tflops * 1e12),
            n_extra_layers=model.n_dense_layers,
            copy_dram_share=min(0.9, profile.pcie.bw_gbs / cpu.mem_bw_gbs),
            expert_bytes_cpu=b_cpu,
            expert_bytes_gpu=b_gpu,
        )

    def cpu_expert(self, n_tokens: int) -> float:
        c = n_tokens * self.cpu_per_token
        return self.cpu_fixed + (c if c > self.cpu_mem else self.cpu_mem)

    def cpu_expert_contended(self, n_tokens: int, busy_copy_fraction: float) -> float:
        """CPU expert time while the copy queue reads host memory for ``busy_copy_fraction`` of it:
        the weight reads get the DRAM bandwidth the copy leaves (bandwidth shares add up to one)."""
        share = self.copy_dram_share * busy_copy_fraction
        mem = self.cpu_mem / (1.0 - share)
        c = n_tokens * self.cpu_per_token
        return self.cpu_fixed + (c if c > mem else mem)

    def gpu_expert(self, n_tokens: int) -> float:
        c = n_tokens * self.gpu_per_token
        return self.gpu_fixed + (c if c > self.gpu_mem else self.gpu_mem)

    def transfer(self) -> float:
        return self.transfer_s

    def non_moe(self, n_tokens: int) -> float:
        """Attention and the rest of one decoder layer on the GPU (shared experts excluded)."""
        c = n_tokens * self.attn_per_token
        return self.layer_fixed + (c if c > self.attn_mem else self.attn_mem)

    def forward_extra(self, n_tokens: int) -> float:
        """Dense layers and the LM head of one forward, on the GPU."""
        c = n_tokens * self.extra_per_token
        return self.n_extra_layers * self.layer_fixed + (c if c > self.extra_mem else self.extra_mem)

    def shared(self, n_tokens: int) -> float:
        """Shared expert(s) of one MoE layer on the GPU; 0 for models without."""
        if self.shared_mem == 0.0:
            return 0.0
        c = n_tokens * self.shared_per_token
        return c if c > self.shared_mem else self.shared_mem


@dataclass(frozen=True, slots=True)
class ReleasedCost:
    """The released HybriMoE scheduler's constants (milliseconds, taken as seconds here).

    t_cpu(n) = c * n, plus 0.79 for the first CPU task of a layer; t_gpu = 0.5 per expert whatever the
    token count; t_move = 0.418 per uncached expert. ``c`` is 1.0 (DeepSeek), 0.2 (Mixtral), 0.8 (Qwen2).
    """

    c: float = 1.0
    cpu_call: float = 0.79
    gpu_call: float = 0.0
    t_gpu: float = 0.5
    t_move: float = 0.418

    def cpu_expert(self, n_tokens: int) -> float:
        return self.c * n_tokens

    def gpu_expert(self, n_tokens: int) -> float:
        return self.t_gpu

    def transfer(self) -> float:
        return self.t_move
