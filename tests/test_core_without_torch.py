"""The decision core, the traces layer (recorder excepted) and the simulator must work without torch.

A fresh interpreter makes ``torch`` unimportable (``sys.modules['torch'] = None`` makes every
``import torch`` raise ImportError), imports every module of those packages, runs one tiny simulation
end to end and reports back as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys

    sys.modules["torch"] = None  # any `import torch` now raises ImportError

    SKIP = {"hybrimoe_kt.traces.recorder"}  # the recorder needs torch by design
    imported = []
    for pkg_name in ("hybrimoe_kt.core", "hybrimoe_kt.sim", "hybrimoe_kt.traces"):
        pkg = importlib.import_module(pkg_name)
        imported.append(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg_name + "."):
            if info.name in SKIP:
                continue
            importlib.import_module(info.name)
            imported.append(info.name)

    from hybrimoe_kt.core.hardware import load_profile
    from hybrimoe_kt.core.models import get_model
    from hybrimoe_kt.sim.runner import SimSetup, simulate
    from hybrimoe_kt.traces.synthetic import synthetic_trace

    trace = synthetic_trace("deepseek-v2-lite", n_requests=2, prompt_len=8, decode_len=8, n_layers=2)
    setup = SimSetup(trace, "tiny", get_model("deepseek-v2-lite"), load_profile("rtx4090-ddr5"))
    records = simulate(setup, ["stock", "hybrimoe", "oracle"], [0.25], workers=1)
    print(json.dumps({
        "imported": imported,
        "records": [[r["strategy"], r["decode_tok_s"]] for r in records],
        "torch_loaded": sys.modules.get("torch", None) is not None,
        "torch_in_modules": "torch" in sys.modules and sys.modules["torch"] is not None,
        "torch_submodules": sorted(m for m in sys.modules if m.startswith("torch.")),
    }))
    """
)


def test_core_traces_sim_import_and_simulate_without_torch() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    imported = set(out["imported"])
    # the walk really reached the leaves of every package
    for mod in ("hybrimoe_kt.core.cache", "hybrimoe_kt.core.strategies", "hybrimoe_kt.core.eviction.belady",
                "hybrimoe_kt.core.schedulers.balanced", "hybrimoe_kt.core.prefetch.impact",
                "hybrimoe_kt.sim.engine", "hybrimoe_kt.sim.runner", "hybrimoe_kt.sim.report",
                "hybrimoe_kt.traces.format", "hybrimoe_kt.traces.synthetic", "hybrimoe_kt.traces.spec"):
        assert mod in imported
    assert "hybrimoe_kt.traces.recorder" not in imported
    assert [name for name, _ in out["records"]] == ["stock", "hybrimoe", "oracle"]
    assert all(tok_s > 0 for _, tok_s in out["records"])
    # only the blocking sentinel (None) may sit under the name 'torch'; nothing of torch was loaded
    assert not out["torch_loaded"]
    assert not out["torch_in_modules"]
    assert out["torch_submodules"] == []


def test_core_import_does_not_pull_torch() -> None:
    """Without any blocker: importing core, sim and traces.format leaves torch out of sys.modules."""
    code = ("import sys, hybrimoe_kt.core.strategies, hybrimoe_kt.sim.runner, hybrimoe_kt.traces.spec; "
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
