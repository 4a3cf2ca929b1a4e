"""Print the README's simulated decode table (markdown) from results/simulate-<model>-<hw>.json.

    python scripts/results_table.py [--hardware rtx4090,rtx5090]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = (("mixtral", "Mixtral-8x7B (real trace)"), ("deepseek-v2-lite", "DeepSeek-V2-Lite (synthetic)"),
          ("qwen3-30b-a3b", "Qwen3-30B-A3B (synthetic)"))
ORDER = ("stock", "static-frequency", "lru-offload", "hybrimoe-paper", "hybrimoe-layer", "hybrimoe", "oracle",
         "roofline")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hardware", default="rtx4090,rtx5090")
    args = ap.parse_args()
    for hw in args.hardware.split(","):
        for key, title in MODELS:
            path = REPO / "results" / f"simulate-{key}-{hw}.json"
            if not path.is_file():
                continue
            recs = json.loads(path.read_text())
            ratios = sorted({r["cache_ratio"] for r in recs})
            r0 = recs[0]
            print(f"\n{title} on {r0['hardware']}, CPU {r0['cpu_format']} / GPU {r0['gpu_format']}, host cost "
                  f"{r0['host_cost']} (`{path.relative_to(REPO)}`): decode tok/s (x stock), hit rate, host us "
                  f"per layer\n")
            print("| strategy | " + " | ".join(f"cache {r:.1%} ({_gib(recs, r)} GiB)" for r in ratios) + " |")
            print("|---|" + "---|" * len(ratios))
            for name in ORDER:
                cells = []
                for ratio in ratios:
                    rec = next((x for x in recs if x["strategy"] == name and x["cache_ratio"] == ratio), None)
                    if rec is None:
                        cells.append("-")
                        continue
                    x = rec.get("speedup_vs_stock")
                    cells.append(f"{rec['decode_tok_s']:.1f} ({x:.2f}x), {rec['hit_rate']:.0%}, "
                                 f"{rec['host_critical_us_per_layer']:.0f}")
                label = name + (" (bound)" if name in ("oracle", "roofline") else "")
                print(f"| {label} | " + " | ".join(cells) + " |")


def _gib(recs: list[dict], ratio: float) -> str:
    g = [r.get("cache_gib", 0.0) for r in recs if r["cache_ratio"] == ratio and r.get("cache_gib")]
    return f"{max(g):.1f}" if g else "0"


if __name__ == "__main__":
    main()
