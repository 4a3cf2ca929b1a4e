"""Human-readable output of simulation records: the comparison table and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def format_table(records: Sequence[dict]) -> str:
    """Decode and prefill tok/s, speedup over stock, hit rate, PCIe traffic, per strategy and ratio."""
    head = ("strategy", "cache", "decode tok/s", "x stock", "prefill tok/s", "x stock", "hit rate",
            "late", "PCIe GB", "GPU experts")
    rows = [head]
    for r in records:
        name = r["strategy"] + (" (bound)" if r.get("bound") else "")
        rows.append((
            name, f"{r['cache_ratio']:.0%}", f"{r['decode_tok_s']:.2f}",
            _x(r.get("speedup_vs_stock")), f"{r['prefill_tok_s']:.1f}",
            _x(r.get("prefill_speedup_vs_stock")), f"{r['hit_rate']:.1%}", f"{r['late_hit_rate']:.1%}",
            f"{r['pcie_gb']:.1f}", f"{r['gpu_expert_share']:.0%}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for j, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _x(v: object) -> str:
    return f"{v:.2f}x" if isinstance(v, (int, float)) else "-"


def plot(records: Sequence[dict], out: Path, title: str) -> Path:
    """Decode tok/s and hit rate against cache ratio, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["strategy"] for r in records))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in names:
        rs = sorted((r for r in records if r["strategy"] == name), key=lambda r: r["cache_ratio"])
        x = [r["cache_ratio"] * 100 for r in rs]
        style = "--" if rs[0].get("bound") else "-"
        ax1.plot(x, [r["decode_tok_s"] for r in rs], style, marker="o", label=name)
        ax2.plot(x, [r["hit_rate"] * 100 for r in rs], style, marker="o", label=name)
    ax1.set(xlabel="GPU expert cache (% of routed experts)", ylabel="decode tok/s (simulated)",
            title="Decode throughput")
    ax2.set(xlabel="GPU expert cache (% of routed experts)", ylabel="hit rate (%)", title="Hit rate")
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
