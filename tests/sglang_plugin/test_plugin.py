"""The sglang-kt plugin against the stand-ins of ``standins.py`` (no host installed).

Covered: the import without the host (one line), registration (id, priority, predicate, kt's id kept),
delegation to kt's method, the kernels' state rewritten in place between steps (same tensors, same
addresses) with outputs equal to a reference MoE at every forward, the decisions equal to what our
Controller decides for the same inputs, the TP path (rank 0 decides, rank 1 mirrors through a
recording ``torch.distributed``), kt's full-GPU prefill left alone, and the errors users can cause.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch

from hybrimoe_kt.core.cache import ExpertCache
from hybrimoe_kt.core.controller import Controller
from tests.sglang_plugin.standins import (Experts, ForwardBatch, ForwardMode, Host, RecordingDist, ServerArgs, install,
                                   reference)

L, E, K, H, I = 3, 8, 2, 16, 32
STATE = ("mask_cpu", "mask_dev", "lut_cpu", "lut_dev", "inverse", "kernel_mask")


def kt_masks(per_layer: int = 2) -> torch.Tensor:
    """kt's load-time placement: experts 0..per_layer-1 of every layer on the GPU."""
    m = torch.zeros(L, E, dtype=torch.bool)
    m[:, :per_layer] = True
    return m


class Tick:
    """A deterministic clock: every reading is 1 ms after the previous one."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1e-3
        return self.t


def plugin_host(monkeypatch: pytest.MonkeyPatch, rank: int = 0, size: int = 1, **env: str) -> Host:
    host = Host(Experts.random(L, E, H, I, seed=0), kt_masks(), rank, size)
    install(monkeypatch, host)
    for var in ("HYBRIMOE_STRATEGY", "HYBRIMOE_CONFIG", "HYBRIMOE_DISABLE", "HYBRIMOE_HARDWARE"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    importlib.import_module("hybrimoe_kt.sglang")
    coord_mod = importlib.import_module("hybrimoe_kt.sglang.coordinator")
    monkeypatch.setattr(coord_mod, "TIMER", Tick())
    return host


def routing(step: int, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows mostly on experts 5 and 6 (not placed by kt), a few elsewhere; bf16 inputs."""
    g = torch.Generator().manual_seed(1000 * step + layer)
    x = torch.randn(n, H, generator=g).to(torch.bfloat16)
    hot = torch.tensor([5, 6]).repeat(n, 1)
    other = torch.randint(0, E, (n, K), generator=g)
    pick = torch.rand(n, 1, generator=g) < 0.25
    ids = torch.where(pick, other, hot)
    ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], (ids[:, 0] + 1) % E, ids[:, 1])
    w = torch.softmax(torch.randn(n, K, generator=g), -1)
    return x, ids, w


def run(runner: Any, host: Host, steps: list[tuple[str, int]], check: bool = True) -> list[list[torch.Tensor]]:
    outs = []
    for s, (kind, n) in enumerate(steps):
        fb = ForwardBatch(ForwardMode(kind), n, [routing(s, l, n) for l in range(L)])
        with torch.no_grad():
            out = runner.forward(fb)
        if check:
            for l, (args, y) in enumerate(zip(fb.inputs, out)):
                ref = reference(host.experts, l, *args)
                err = float((y - ref).norm() / ref.norm())
                assert err < 2e-2, f"step {s} ({kind}) layer {l}: relative error {err}"
        outs.append(out)
    return outs


STEPS = [("prefill", 12)] + [("decode", 1)] * 12 + [("prefill", 6)] + [("decode", 2)] * 6


# --- import, registration, delegation ------------------------------------------------------------------

def test_import_without_the_host_is_one_clear_line() -> None:
    code = ("import sys; sys.modules['sglang'] = None\n"
            "import hybrimoe_kt, hybrimoe_kt.core.strategies\n"
            "assert 'hybrimoe_kt.sglang' not in sys.modules\n"
            "try:\n    import hybrimoe_kt.sglang\nexcept ImportError as e:\n    print(str(e))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "sglang-kt" in lines[0] and "not installed" in lines[0]


def test_registration_keeps_kt_id_and_wraps_outside_kt(monkeypatch: pytest.MonkeyPatch) -> None:
    host = plugin_host(monkeypatch)
    plugin = importlib.import_module("hybrimoe_kt.sglang.plugin")
    entries = {w[1]: w[0] for w in host.registry._QUANT_WRAPPERS}
    assert entries == {"kt_ep": 20, "hybrimoe": 30} and plugin.PRIORITY > 20
    plugin.register()  # a second registration is ignored by the registry
    assert len(host.registry._QUANT_WRAPPERS) == 2
    model, _ = host.build(ServerArgs(), K, H, I)
    m = model.layers[0].quant_method
    assert type(m).__name__ == "HybriMoEMethod" and m._quant_wrapper_id == "kt_ep"
    assert host.registry.is_wrapped_method(m, "kt_ep")
    assert isinstance(m.inner, host.kt.KTEPWrapperMethod) and m.gpu_method is m.inner.gpu_method
    # what the host's weight loader reads through the wrapper is kt's own state
    assert m.num_gpu_experts == 2 and m.gpu_experts_mask is m.inner.gpu_experts_mask
    assert m.logical_to_gpu_index is m.inner.logical_to_gpu_index and m.name == "unquantized"
    m.some_flag = 3  # attributes the host sets land on kt's method
    assert m.inner.some_flag == 3 and "some_flag" not in vars(m)
    assert plugin.current() is not None and sorted(plugin.current().layers) == [0, 1, 2]


def test_predicate_declines_without_kt_or_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    host = plugin_host(monkeypatch)
    plugin = importlib.import_module("hybrimoe_kt.sglang.plugin")
    layer = type("L", (), {"layer_id": 0})()
    assert plugin.predicate(layer, ServerArgs(kt_weight_path=None)) is None
    assert plugin.predicate(layer, ServerArgs()).strategy == "hybrimoe"
    monkeypatch.setenv("HYBRIMOE_DISABLE", "1")
    assert plugin.predicate(layer, ServerArgs()) is None
    model, _ = host.build(ServerArgs(), K, H, I)
    assert type(model.layers[0].quant_method).__name__ == "KTEPWrapperMethod"  # kt's, untouched
    other = object()
    assert plugin.factory(layer, other, plugin.load_settings({})) is other  # not kt's: unchanged


def test_apply_delegates_to_kt(monkeypatch: pytest.MonkeyPatch) -> None:
    host = plugin_host(monkeypatch)
    model, runner = host.build(ServerArgs(), K, H, I)
    run(runner, host, [("decode", 1), ("decode", 1)])
    assert all(layer.quant_method.inner.calls == 2 for layer in model.layers)


# --- the kernels' state, between steps -----------------------------------------------------------------

def state_of(layer: Any) -> dict[str, torch.Tensor]:
    m = layer.quant_method.inner
    return {"mask_cpu": m.gpu_experts_mask, "mask_dev": m.gpu_experts_mask_cuda, "lut_cpu": m.logical_to_gpu_index,
            "lut_dev": m.logical_to_gpu_index_cuda, "inverse": m.gpu_index_to_logical,
            "kernel_mask": m.wrapper.gpu_experts_mask, "w13": layer.w13_weight, "w2": layer.w2_weight}


def test_masks_and_slots_are_rewritten_in_place_and_outputs_stay_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    host = plugin_host(monkeypatch)
    model, runner = host.build(ServerArgs(), K, H, I)
    before = [{k: (t, t.data_ptr()) for k, t in state_of(layer).items()} for layer in model.layers]
    run(runner, host, STEPS)  # every forward's output checked against the reference
    coord = importlib.import_module("hybrimoe_kt.sglang.plugin").current()
    assert coord.stats.swaps > 0 and coord.stats.upkeeps == len(STEPS)
    assert coord.stats.demand_loads + coord.stats.swaps > 0
    for layer, old in zip(model.layers, before):
        now = state_of(layer)
        for k, (t, ptr) in old.items():
            assert now[k] is t and now[k].data_ptr() == ptr, k  # same tensor objects, same storage
        m = layer.quant_method.inner
        mask, lut = m.gpu_experts_mask, m.logical_to_gpu_index
        assert torch.equal(m.gpu_experts_mask_cuda, mask) and torch.equal(m.wrapper.gpu_experts_mask, mask)
        assert torch.equal(m.logical_to_gpu_index_cuda, lut)
        assert int(mask.sum()) <= m.num_gpu_experts and torch.equal(lut >= 0, mask)
        for e in torch.where(mask)[0].tolist():  # a visible expert's slot holds its weights
            s = int(lut[e])
            w13, w2 = host.experts.part(layer.layer_id, e, 0, 1)
            assert torch.equal(layer.w13_weight[s], w13) and torch.equal(layer.w2_weight[s], w2)
            assert int(m.gpu_index_to_logical[s]) == e
    hot = sum(int(layer.quant_method.inner.gpu_experts_mask[[5, 6]].sum()) for layer in model.layers)
    assert hot > 0, "the upkeep never brought the hot experts to the GPU"


def test_decisions_are_the_controllers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every call the plugin makes into its Controller, replayed into a fresh Controller built the same
    way, gives the same answers; the published masks are that Controller's visible residency."""
    host = plugin_host(monkeypatch)
    model, runner = host.build(ServerArgs(), K, H, I)
    coord = importlib.import_module("hybrimoe_kt.sglang.plugin").current()
    calls: list[tuple[str, tuple, dict, Any]] = []
    published: list[np.ndarray] = []

    def hook_controller() -> None:
        ctl = coord.controller
        for name in ("decide", "background", "finish", "upkeep"):
            real = getattr(ctl, name)

            def rec(*a: Any, _n: str = name, _f: Any = real, **kw: Any) -> Any:
                out = _f(*a, **kw)
                calls.append((_n, a, kw, out))
                return out
            setattr(ctl, name, rec)

    coord.build()
    hook_controller()
    for s, (kind, n) in enumerate(STEPS):
        runner.forward(ForwardBatch(ForwardMode(kind), n, [routing(s, l, n) for l in range(L)]))
        if kind == "decode":
            published.append(np.stack([layer.quant_method.inner.gpu_experts_mask.numpy() for layer in model.layers]))
    assert {c[0] for c in calls} == {"decide", "background", "finish", "upkeep"}
    # the reference: the same spec, quotas, placement and cost model, fed the same inputs
    spec = coord.spec
    from hybrimoe_kt.core.cost import RooflineCost
    from hybrimoe_kt.core.hardware import load_profile
    from hybrimoe_kt.core.protocols import Clock
    from hybrimoe_kt.core.strategies import build_policies
    clock = Clock()
    pol = build_policies(spec, L, E, K, 2, clock)
    cache = ExpertCache(L, E, [2] * L, pol.eviction)
    cache.place([(l, e) for l in range(L) for e in range(2)])
    cost = RooflineCost.build(load_profile("rtx4090-ddr5"), _preset(), "bf16", "bf16")
    ref = Controller(pol, cache, cost, clock, K)
    decode_masks = iter(published)
    for name, args, kw, out in calls:
        got = getattr(ref, name)(*args, **kw)
        assert got == out, name
        if name == "upkeep" and kw["plan"]:  # the coming forward is a decode step: its masks
            assert np.array_equal(next(decode_masks), ref.visible() & cache.resident_mask())
    assert sum(len(o.copies) for n, _, _, o in calls if n == "upkeep") == coord.stats.swaps > 0


def _preset() -> Any:
    from hybrimoe_kt.core.models import ModelPreset
    return ModelPreset("sglang-kt-model", "", L, 0, E, K, 0, H, I, 0, 4 * H * H, 0)


def test_prefill_plan_sets_the_layers_split_and_demand_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    host = plugin_host(monkeypatch)
    model, runner = host.build(ServerArgs(), K, H, I)
    coord = importlib.import_module("hybrimoe_kt.sglang.plugin").current()
    coord.build()
    seen: list[tuple[int, Any, np.ndarray]] = []
    for layer in model.layers:
        inner = layer.quant_method.inner
        real = inner.apply

        def spy(lay: Any, d: Any, _r: Any = real, _m: Any = inner) -> Any:
            seen.append((lay.layer_id, _m.gpu_experts_mask.numpy().copy(), _m.wrapper.gpu_experts_mask.numpy().copy()))
            return _r(lay, d)
        inner.apply = spy
    decide = coord.controller.decide
    plans: list[Any] = []
    coord.controller.decide = lambda *a, **k: plans.append(decide(*a, **k)) or plans[-1]
    run(runner, host, [("prefill", 24)])
    assert len(plans) == L and [s[0] for s in seen] == [0, 1, 2]
    for d, (_, mask, kernel_mask) in zip(plans, seen):
        # kt computes our split; a demand load without a free slot goes to the CPU kernel instead
        assert sorted(np.flatnonzero(mask).tolist()) == sorted(set(d.plan.gpu) - set(d.streamed))
        assert np.array_equal(mask, kernel_mask)                             # both kernels agree
    assert coord.stats.demand_loads == sum(len(d.plan.loads) - len(d.streamed) for d in plans) > 0
    assert coord.stats.cpu_fallbacks == sum(len(d.streamed) for d in plans)


def test_calls_outside_announced_forwards_never_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA graph capture runs the model without ModelRunner.forward: such calls only record."""
    host = plugin_host(monkeypatch)
    model, runner = host.build(ServerArgs(), K, H, I)
    masks = [layer.quant_method.inner.gpu_experts_mask.clone() for layer in model.layers]
    fb = ForwardBatch(ForwardMode("decode"), 8, [routing(0, l, 8) for l in range(L)])
    with torch.no_grad():
        out = model(fb)  # 8 rows, not through the runner
    for l, (args, y) in enumerate(zip(fb.inputs, out)):
        assert float((y - reference(host.experts, l, *args)).norm()) < 2e-2 * float(reference(host.experts, l, *args).norm())
    coord = importlib.import_module("hybrimoe_kt.sglang.plugin").current()
    assert coord.stats.demand_loads == coord.stats.upkeeps == coord.stats.syncs == 0
    assert all(torch.equal(m, layer.quant_method.inner.gpu_experts_mask) for m, layer in zip(masks, model.layers))


def test_kt_full_gpu_prefill_is_left_to_kt(monkeypatch: pytest.MonkeyPatch) -> None:
    host = plugin_host(monkeypatch)
    model, runner = host.build(ServerArgs(kt_gpu_prefill_token_threshold=16), K, H, I)
    run(runner, host, [("prefill", 16), ("decode", 1), ("prefill", 15)])
    coord = importlib.import_module("hybrimoe_kt.sglang.plugin").current()
    assert coord.stats.kt_full_gpu == L  # the 16-row prefill; the 15-row one got our plan
    assert coord.stats.upkeeps == 3


# --- tensor parallelism --------------------------------------------------------------------------------

def test_tp_rank_zero_decides_and_rank_one_mirrors(monkeypatch: pytest.MonkeyPatch) -> None:
    dist = RecordingDist()
    host_mod = importlib.import_module("hybrimoe_kt.sglang.host")
    results = []
    for rank in (0, 1):
        dist.rank = rank
        host = plugin_host(monkeypatch, rank=rank, size=2)
        monkeypatch.setattr(importlib.import_module("hybrimoe_kt.sglang.host"), "_dist", lambda: dist)
        model, runner = host.build(ServerArgs(), K, H, I)
        outs = run(runner, host, STEPS, check=False)
        coord = importlib.import_module("hybrimoe_kt.sglang.plugin").current()
        layers = [(l.quant_method.inner.gpu_experts_mask.clone(), l.quant_method.inner.logical_to_gpu_index.clone(),
                   l.w13_weight.detach().clone(), l.w2_weight.detach().clone()) for l in model.layers]
        results.append((outs, coord, layers, host))
    assert host_mod is not None and dist.pos == len(dist.log) > 0  # rank 1 consumed every collective
    (out0, c0, s0, h0), (out1, c1, s1, _) = results
    assert c0.controller is not None and c1.controller is None   # only rank 0 runs the core
    assert c0.stats.swaps > 0 and np.array_equal(c0.table, c1.table)
    for (m0, l0, _, _), (m1, l1, _, _) in zip(s0, s1):
        assert torch.equal(m0, m1) and torch.equal(l0, l1)       # the same masks on both ranks
    for (_, _, w0, v0), (_, _, w1, v1), l in zip(s0, s1, range(L)):
        assert w0.shape[1] == 2 * (I // 2) and not torch.equal(w0, w1)  # each rank its own partition
    for s, (kind, n) in enumerate(STEPS):  # rank outputs add up to the whole MoE (an all-reduce)
        for l in range(L):
            ref = reference(h0.experts, l, *routing(s, l, n))
            got = out0[s][l] + out1[s][l]
            assert float((got - ref).norm() / ref.norm()) < 2e-2, (s, l)


# --- errors users can cause ----------------------------------------------------------------------------

def test_kt_dynamic_update_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    host = plugin_host(monkeypatch)
    with pytest.raises(ValueError, match="drop --kt-enable-dynamic-expert-update"):
        host.build(ServerArgs(kt_enable_dynamic_expert_update=True), K, H, I)


def test_unsupported_gpu_weights_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    host = plugin_host(monkeypatch)
    model, runner = host.build(ServerArgs(), K, H, I)
    model.layers[1].w13_weight = torch.nn.Parameter(torch.zeros(2, 2 * I, H // 8, dtype=torch.int32),
                                                    requires_grad=False)  # e.g. a Marlin-repacked layer
    host_mod = importlib.import_module("hybrimoe_kt.sglang.host")
    with pytest.raises(host_mod.UnsupportedHost, match="MoE layer 1: hybrimoe rewrites BF16 GPU experts"):
        run(runner, host, [("decode", 1)])


@pytest.mark.parametrize("env, message", [
    ({"HYBRIMOE_STRATEGY": "kt-frequency"}, "cannot run inside sglang-kt"),
    ({"HYBRIMOE_STRATEGY": "no-such"}, "unknown strategy 'no-such'"),
    ({"HYBRIMOE_MAX_DECODE_ROWS": "x"}, "max_decode_rows must be an integer"),
    ({"HYBRIMOE_CPU_FORMAT": "fp4"}, "cpu_format 'fp4'"),
])
def test_bad_settings(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str) -> None:
    plugin_host(monkeypatch)
    settings = importlib.import_module("hybrimoe_kt.sglang.settings")
    with pytest.raises(ValueError, match=message):
        settings.load_settings(env)


def test_config_file_and_precedence(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    plugin_host(monkeypatch)
    settings = importlib.import_module("hybrimoe_kt.sglang.settings")
    cfg = tmp_path / "hybrimoe.json"
    cfg.write_text(json.dumps({"strategy": "hybrimoe", "hardware": "rtx5090-ddr5", "max_decode_rows": 64}))
    got = settings.load_settings({"HYBRIMOE_CONFIG": str(cfg), "HYBRIMOE_HARDWARE": "rtx3090-ddr4"})
    assert (got.strategy, got.hardware, got.max_decode_rows) == ("hybrimoe", "rtx3090-ddr4", 64)
    assert not got.spec().prefill_stream  # the host's layers have no staging slots
    yml = tmp_path / "hybrimoe.yaml"
    yml.write_text("strategy: hybrimoe\nenabled: false\n")
    assert settings.load_settings({"HYBRIMOE_CONFIG": str(yml)}).enabled is False
    cfg.write_text(json.dumps({"stratgy": "hybrimoe"}))
    with pytest.raises(ValueError, match="unknown key.*stratgy.*allowed"):
        settings.load_settings({"HYBRIMOE_CONFIG": str(cfg)})
    with pytest.raises(ValueError, match="no such file"):
        settings.load_settings({"HYBRIMOE_CONFIG": str(tmp_path / "missing.json")})
    cfg.write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        settings.load_settings({"HYBRIMOE_CONFIG": str(cfg)})
