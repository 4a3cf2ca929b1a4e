"""The comparison table, its legend and the plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybrimoe_kt.sim.report import STYLES, format_table, plot, plot_title, styles_for, table_legend

NAMES = ["stock", "static-frequency", "lru-offload", "hybrimoe-paper", "hybrimoe", "oracle", "roofline"]


def records(host: bool) -> list[dict]:
    out = []
    for i, name in enumerate(NAMES):
        for ratio in (0.25, 0.5):
            r = {"strategy": name, "cache_ratio": ratio, "decode_tok_s": 10.0 + i, "speedup_vs_stock": 1.0 + i,
                 "prefill_tok_s": 100.0, "prefill_speedup_vs_stock": None, "hit_rate": 0.5, "late_hit_rate": 0.01,
                 "pcie_gb": 1.5, "gpu_expert_share": 0.4, "bound": name in ("oracle", "roofline")}
            if host:
                r["host_critical_us_per_layer"] = 0.0 if r["bound"] else 123.456
            out.append(r)
    return out


def test_table_has_a_host_column_only_when_records_carry_it() -> None:
    with_host = format_table(records(host=True)).splitlines()
    assert with_host[0].split()[-2:] == ["host", "us"]
    assert with_host[2].endswith("123.5") and with_host[-1].endswith("0.0")
    assert "host us" not in format_table(records(host=False))


def test_legend_explains_the_columns() -> None:
    text = table_legend()
    for col in ("late", "GPU experts", "x stock", "host us", "hit rate"):
        assert any(line.strip().startswith(col) for line in text.splitlines()), col
    assert "host us" not in table_legend(host=False)


def test_every_strategy_has_its_own_look() -> None:
    looks = {(s["color"], s["marker"], str(s["linestyle"])) for s in STYLES.values()}
    assert len(looks) == len(STYLES)
    st = styles_for(NAMES + ["custom-a", "custom-b"])
    assert st["custom-a"] != st["custom-b"]
    assert st["static-frequency"]["marker"] != st["hybrimoe-paper"]["marker"]
    assert st["static-frequency"]["linestyle"] != st["hybrimoe-paper"]["linestyle"]


def test_title_carries_host_cost_and_projection() -> None:
    assert plot_title("T", "zero", True) == "T\nhost cost: zero | PROJECTION (a weight format the runtime does not run yet)"
    assert plot_title("T") == "T\nhost cost: profile"
    assert plot_title("T - host cost: profile") == "T - host cost: profile"


def test_plot_writes_one_figure_level_legend(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    captured = {}
    orig = plt.Figure.legend

    def spy(self, *a, **kw):  # type: ignore[no-untyped-def]
        captured["labels"] = list(a[1])
        return orig(self, *a, **kw)

    plt.Figure.legend = spy
    try:
        out = plot(records(host=True), tmp_path / "p.png", "SIMULATED", host_cost="profile", projection=True)
    finally:
        plt.Figure.legend = orig
    assert out.is_file() and out.stat().st_size > 1000
    assert captured["labels"] == NAMES[:5] + ["oracle (bound)", "roofline (bound)"]
