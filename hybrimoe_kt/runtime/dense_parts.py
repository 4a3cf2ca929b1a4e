"""The non-expert work of a benchmark stack: attention-like projections and shared experts per layer.

A decoder layer of a MoE model runs its attention (and norms) before the MoE block and, in families
such as DeepSeek-V2, shared experts next to the routed ones, both on the GPU tier. ``DenseParts`` holds
random bf16 weights of that size on the tier's device so that a replayed stack (``runtime.harness``)
spends that time too:

- attention-like: ``x -> o(q(x))`` with ``q [A, H]`` and ``o [H, A]`` (``attn_params = 2 * A * H``);
- shared experts: one SiLU-gated MLP of total width ``S`` (``gate, up [S, H]``, ``down [H, S]``).

It stands in for the cost; it is not an attention mechanism. ``measure`` times both parts alone (the
fastest of repeats), which prices them for the simulator when the GPU tier is the CPU stand-in.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

SharedFn = Callable[[torch.Tensor], torch.Tensor]


class DenseParts:
    def __init__(self, n_layers: int, hidden: int, attn_width: int, shared_inter: int, device: torch.device,
                 seed: int = 0) -> None:
        if n_layers < 1 or hidden < 1 or attn_width < 0 or shared_inter < 0:
            raise ValueError(f"DenseParts needs n_layers, hidden >= 1 and widths >= 0; got n_layers={n_layers}, "
                             f"hidden={hidden}, attn_width={attn_width}, shared_inter={shared_inter}")
        gen = torch.Generator().manual_seed(seed)

        def w(rows: int, cols: int) -> torch.Tensor:
            return (torch.randn(rows, cols, generator=gen) * cols ** -0.5).to(torch.bfloat16).to(device)

        self.n_layers, self.hidden = n_layers, hidden
        self.attn_width, self.shared_inter = attn_width, shared_inter
        self.q = [w(attn_width, hidden) for _ in range(n_layers)] if attn_width else []    # [A, H]
        self.o = [w(hidden, attn_width) for _ in range(n_layers)] if attn_width else []    # [H, A]
        self.gate = [w(shared_inter, hidden) for _ in range(n_layers)] if shared_inter else []  # [S, H]
        self.up = [w(shared_inter, hidden) for _ in range(n_layers)] if shared_inter else []    # [S, H]
        self.down = [w(hidden, shared_inter) for _ in range(n_layers)] if shared_inter else []  # [H, S]

    @property
    def attn_params(self) -> int:
        return 2 * self.attn_width * self.hidden

    def attention(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The attention-like part of ``layer`` for ``x [N, H]`` bf16: ``x`` plus its projection."""
        if not self.attn_width:
            return x
        return x + F.linear(F.linear(x, self.q[layer]), self.o[layer])

    def shared(self, layer: int) -> Optional[SharedFn]:
        """The shared experts of ``layer`` as the runtime's ``shared`` callable (None without them)."""
        if not self.shared_inter:
            return None
        g, u, d = self.gate[layer], self.up[layer], self.down[layer]

        def run(x: torch.Tensor) -> torch.Tensor:
            xb = x.to(g.dtype)
            return F.linear(F.silu(F.linear(xb, g)) * F.linear(xb, u), d)

        return run

    def measure(self, n_tokens: int, repeats: int = 5, sync: Callable[[], None] = lambda: None
                ) -> tuple[float, float]:
        """Fastest seconds of (attention-like part, shared experts) for ``n_tokens`` rows, cycling the
        layers so the weights are not all cache-resident."""
        dev = (self.q or self.gate or [torch.empty(0)])[0].device
        x = torch.randn(n_tokens, self.hidden, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(dev)
        best = [float("inf"), float("inf")]
        fns: list[Callable[[int], object]] = [lambda l: self.attention(l, x),
                                              lambda l: (self.shared(l) or (lambda t: t))(x)]
        for part, fn in enumerate(fns):
            if (self.attn_width, self.shared_inter)[part] == 0:
                best[part] = 0.0
                continue
            fn(0)
            for r in range(repeats * self.n_layers):
                sync()
                t0 = time.perf_counter()
                fn(r % self.n_layers)
                sync()
                best[part] = min(best[part], time.perf_counter() - t0)
        return best[0], best[1]
