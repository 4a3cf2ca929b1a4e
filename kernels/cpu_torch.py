"""Pure-torch CPU expert backend: the reference implementation and the fallback without kt-kernel.

Synchronous: ``submit`` computes right away and ``sync`` does nothing. Per expert it gathers the
tokens routed to it, runs down(silu(gate x) * up x) with BF16 weights, and accumulates the routing-
weighted result in FP32 before one final cast to BF16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybrimoe_kt.kernels.cpu_backend import check_call, check_weights


class TorchCpuBackend:
    name = "torch"

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, n_threads: int = 1):
        self.n_experts, self.hidden, self.intermediate = check_weights(gate, up, down)
        if n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        self.n_threads = n_threads
        self.gate = gate.contiguous()  # [E, I, H]
        self.up = up.contiguous()      # [E, I, H]
        self.down = down.contiguous()  # [E, H, I]
        self.gpu_mask = torch.zeros(self.n_experts, dtype=torch.bool)  # [E]

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
               out: torch.Tensor) -> None:
        check_call(x, ids, weights, out, self.hidden, self.n_experts)
        prev = torch.get_num_threads()
        if prev != self.n_threads:
            torch.set_num_threads(self.n_threads)
        try:
            out.copy_(self._compute(x, ids, weights))
        finally:
            if prev != self.n_threads:
                torch.set_num_threads(prev)

    def sync(self) -> None:
        return None

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty(x.shape[0], self.hidden, dtype=torch.bfloat16)
        self.submit(x, ids, weights, out)
        self.sync()
        return out

    def _expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """BF16 gate [I, H], up [I, H], down [H, I] of expert ``e`` (subclasses may build them lazily)."""
        return self.gate[e], self.up[e], self.down[e]

    def _compute(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        acc = torch.zeros(x.shape[0], self.hidden, dtype=torch.float32)  # [N, H]
        valid = ids >= 0                                                  # [N, K]
        if valid.any():
            valid &= ~self.gpu_mask[ids.clamp(min=0)]
        rows, cols = valid.nonzero(as_tuple=True)                        # [M], [M]
        if rows.numel() == 0:
            return acc.to(torch.bfloat16)
        experts = ids[rows, cols]                                         # [M]
        order = torch.argsort(experts, stable=True)
        rows, cols, experts = rows[order], cols[order], experts[order]
        uniq, counts = torch.unique_consecutive(experts, return_counts=True)
        start = 0
        for e, c in zip(uniq.tolist(), counts.tolist()):
            r = rows[start:start + c]                                     # [c]
            xe = x[r]                                                     # [c, H]
            wg, wu, wd = self._expert(e)
            g = F.linear(xe, wg).float()                                  # [c, I]
            u = F.linear(xe, wu).float()                                  # [c, I]
            h = (F.silu(g) * u).to(torch.bfloat16)                        # [c, I]
            y = F.linear(h, wd).float()                                   # [c, H]
            acc.index_add_(0, r, y * weights[r, cols[start:start + c]].unsqueeze(1))
            start += c
        return acc.to(torch.bfloat16)
