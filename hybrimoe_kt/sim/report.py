"""Human-readable output of simulation records: the comparison table, its legend and the plot."""

from __future__ import annotations

from itertools import cycle
from pathlib import Path
from typing import Any, Iterator, Sequence

HOST_KEY = "host_critical_us_per_layer"  # host time on the critical path, us per layer call

# A fixed look per strategy (colour, marker, line style, filled marker), so that lines that coincide
# stay distinguishable (static-frequency often sits on hybrimoe-paper) and figures agree with each other.
STYLES: dict[str, dict[str, Any]] = {
    "stock": dict(color="#7f7f7f", marker="s", linestyle="-", fillstyle="full"),
    "static-frequency": dict(color="#1f77b4", marker="^", linestyle=(0, (6, 2)), fillstyle="none",
                             markersize=9),
    "lru-offload": dict(color="#ff7f0e", marker="v", linestyle="-.", fillstyle="full"),
    "hybrimoe-paper": dict(color="#2ca02c", marker="D", linestyle="-", fillstyle="full", markersize=5),
    "hybrimoe-layer": dict(color="#ff9896", marker="o", linestyle="--", fillstyle="none", markersize=7),
    "hybrimoe": dict(color="#d62728", marker="o", linestyle="-", fillstyle="full", linewidth=2.2),
    "oracle": dict(color="#9467bd", marker="*", linestyle=":", fillstyle="full", markersize=9),
    "roofline": dict(color="#000000", marker="x", linestyle=(0, (1, 3)), fillstyle="full"),
}
_SPARE = [dict(color=c, marker=m, linestyle=ls, fillstyle="none")
          for c, m, ls in zip(["#8c564b", "#e377c2", "#bcbd22", "#17becf"], ["P", "h", "<", ">"],
                              [(0, (3, 1, 1, 1)), (0, (8, 3)), "--", (0, (2, 2))])]

LEGEND = (
    ("cache", "GPU expert cache size, as a share of the routed experts"),
    ("decode tok/s", "simulated decode throughput (cost model of the hardware profile)"),
    ("x stock", "speedup over the stock strategy at the same cache size (decode, then prefill)"),
    ("prefill tok/s", "simulated prefill throughput"),
    ("hit rate", "activated experts already resident on the GPU (late hits included), prefill included"),
    ("late", "late hits: resident, but the copy was still in flight when the layer needed it"),
    ("PCIe GB", "host-to-GPU expert copies (demand loads, admissions, prefetches)"),
    ("GPU experts", "share of activated routed experts computed on the GPU (the rest run on the CPU)"),
    ("host us", "host time on the critical path, us per MoE layer call, from the profile's host "
                "section (0: bounds, --host-cost zero)"),
    ("(bound)", "not deployable: oracle = clairvoyant, roofline = bandwidth bound"),
)


def format_table(records: Sequence[dict]) -> str:
    """Decode and prefill tok/s, speedup over stock, hit rate, PCIe traffic, per strategy and ratio.

    A ``host us`` column (``host_critical_us_per_layer``) is added when any record carries it.
    """
    host = any(HOST_KEY in r for r in records)
    head = ("strategy", "cache", "decode tok/s", "x stock", "prefill tok/s", "x stock", "hit rate",
            "late", "PCIe GB", "GPU experts") + (("host us",) if host else ())
    rows = [head]
    for r in records:
        name = r["strategy"] + (" (bound)" if r.get("bound") else "")
        row = (
            name, f"{r['cache_ratio']:.0%}", f"{r['decode_tok_s']:.2f}",
            _x(r.get("speedup_vs_stock")), f"{r['prefill_tok_s']:.1f}",
            _x(r.get("prefill_speedup_vs_stock")), f"{r['hit_rate']:.1%}", f"{r['late_hit_rate']:.1%}",
            f"{r['pcie_gb']:.1f}", f"{r['gpu_expert_share']:.0%}",
        )
        if host:
            v = r.get(HOST_KEY)
            row += (f"{v:.1f}" if isinstance(v, (int, float)) else "-",)
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for j, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def table_legend(host: bool = True) -> str:
    """What the table's columns mean, one line each, ready to print under ``format_table``.

    ``host=False`` leaves out the ``host us`` line (for a table without that column).
    """
    items = [(k, v) for k, v in LEGEND if host or k != "host us"]
    w = max(len(k) for k, _ in items)
    return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in items)


def _x(v: object) -> str:
    return f"{v:.2f}x" if isinstance(v, (int, float)) else "-"


def styles_for(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A distinct look per strategy: the fixed one for known names, spare ones for the others."""
    spare: Iterator[dict[str, Any]] = cycle(_SPARE)
    return {n: dict(STYLES[n]) if n in STYLES else dict(next(spare)) for n in names}


def plot_title(title: str, host_cost: str = "profile", projection: bool = False) -> str:
    """The caller's title plus a line with the host-cost mode and, for projections, a label."""
    extra = [] if "host cost" in title else [f"host cost: {host_cost}"]
    if projection and "projection" not in title.lower():
        extra.append("PROJECTION (a weight format the runtime does not run yet)")
    return title + ("\n" + " | ".join(extra) if extra else "")


def plot(records: Sequence[dict], out: Path, title: str, *, host_cost: str = "profile",
         projection: bool = False) -> Path:
    """Decode tok/s and hit rate against cache ratio, one styled line per strategy, one legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["strategy"] for r in records))
    styles = styles_for(names)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.8))
    handles = []
    for name in names:
        rs = sorted((r for r in records if r["strategy"] == name), key=lambda r: r["cache_ratio"])
        x = [r["cache_ratio"] * 100 for r in rs]
        label = name + (" (bound)" if rs[0].get("bound") else "")
        st = styles[name]
        (h,) = ax1.plot(x, [r["decode_tok_s"] for r in rs], label=label, **st)
        ax2.plot(x, [r["hit_rate"] * 100 for r in rs], label=label, **st)
        handles.append(h)
    ax1.set(xlabel="GPU expert cache (% of routed experts)", ylabel="decode tok/s (simulated)",
            title="Decode throughput")
    ax2.set(xlabel="GPU expert cache (% of routed experts)", ylabel="hit rate (%)", title="Hit rate")
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    ncol = min(len(handles), 4)
    fig.legend(handles, [h.get_label() for h in handles], loc="lower center", ncol=ncol, fontsize=8,
               frameon=False)
    fig.suptitle(plot_title(title, host_cost, projection), fontsize=10)
    rows = -(-len(handles) // ncol) if handles else 0
    fig.tight_layout(rect=(0, 0.05 * rows + 0.02, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
