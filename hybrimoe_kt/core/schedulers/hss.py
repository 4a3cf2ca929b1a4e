"""``hss``: the released HybriMoE greedy (hybrid scheduling), made token-aware.

The queue is the resident experts (canonical order: ready time, then tokens desc) followed by the
non-resident ones (tokens desc). Three clocks start at ``T_gpu = gpu_free``, ``T_cpu = 0`` and
``T_move = copy_free``. While the queue is not empty, with ``f`` its front and ``b`` its back:

- GPU candidate: ``f`` starts at ``max(T_gpu (+ gpu_call if the GPU has no task yet), avail_f)`` where
  ``avail_f`` is ``ready[f]`` (0 if absent) for a resident expert and ``T_move + transfer`` for a
  non-resident one (its copy is serialized after the earlier loads); it ends ``gpu_expert(n_f)`` later.
  With ``gpu_call = 0`` and nothing in flight this is the release's
  ``T_gpu + t_gpu + max(0, T_move + t_move - T_gpu)``.
- CPU candidate: ``b`` ends at ``T_cpu + cpu_expert(n_b)`` plus ``cpu_call`` if the CPU has no task yet
  (the release's "+0.79 for the first CPU task").
- If the GPU candidate ends no later than the CPU candidate, ``f`` goes to the GPU (advancing ``T_move``
  by one transfer if it is a load); otherwise ``b`` goes to the CPU.

So the GPU gets a prefix of the queue and the CPU the rest. Unlike the release, real token counts are
used in decode and prefill alike. The split is priced with the shared evaluator (``makespan.py``).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from hybrimoe_kt.core.protocols import EMPTY_READY
from hybrimoe_kt.core.schedulers.costtable import CostTable
from hybrimoe_kt.core.schedulers.prefix import PrefixScheduler


def hss_cut(res: Sequence[int], res_n: Sequence[int], unc_n: Sequence[int], table: CostTable,
            ready: Mapping[int, float] = EMPTY_READY, copy_free: float = 0.0,
            gpu_free: float = 0.0) -> int:
    """How many experts from the front of the queue ``res ++ unc`` the greedy gives the GPU.

    ``res``/``res_n``: resident experts and their token counts in canonical order; ``unc_n``: token
    counts of the non-resident experts in copy order.
    """
    m = len(res)
    ns = list(res_n) + list(unc_n)
    size = table.size
    cpu_tab, gpu_tab, cost = table.cpu, table.gpu, table.cost
    t_move = table.transfer
    t_gpu = gpu_free + table.gpu_call   # start of the first GPU task (call overhead folded in)
    t_cpu = table.cpu_call              # end of the CPU's work if it gets a first task
    t_mv = copy_free
    i, j = 0, len(ns) - 1
    while i <= j:
        n = ns[i]
        if i < m:
            avail = ready.get(res[i], 0.0) if ready else 0.0
        else:
            avail = t_mv + t_move
        g_end = (avail if avail > t_gpu else t_gpu) + (gpu_tab[n] if n < size else cost.gpu_expert(n))
        nb = ns[j]
        c_end = t_cpu + (cpu_tab[nb] if nb < size else cost.cpu_expert(nb))
        if g_end <= c_end:
            t_gpu = g_end
            if i >= m:
                t_mv += t_move
            i += 1
        else:
            t_cpu = c_end
            j -= 1
    return i


class HssScheduler(PrefixScheduler):
    """The released HybriMoE greedy, token-aware, honouring ``ready``, ``copy_free`` and ``gpu_free``."""

    name = "hss"

    def cut(self, res, res_n, unc, unc_n, table, ready, copy_free, gpu_free):  # type: ignore[no-untyped-def]
        n = hss_cut(res, res_n, unc_n, table, ready, copy_free, gpu_free)
        m = len(res)
        return (n, 0) if n <= m else (m, n - m)
