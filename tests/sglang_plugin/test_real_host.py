"""The plugin against the real sglang-kt, where it is installed (it needs CUDA; never on CI).

Checks that every host name ``hybrimoe_kt.sglang.host`` relies on exists with the expected shape, and
that importing the plugin registers it next to kt's wrapper in the real registry.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

pytestmark = pytest.mark.sglang_kt


@pytest.fixture(scope="module")
def sglang_kt():  # type: ignore[no-untyped-def]
    try:
        registry = importlib.import_module("sglang.srt.layers.moe.quant_method_registry")
        kt = importlib.import_module("sglang.srt.layers.moe.kt_ep_wrapper")
        runner = importlib.import_module("sglang.srt.model_executor.model_runner")
    except Exception as e:  # not installed, or installed without its CUDA dependencies
        pytest.skip(f"sglang-kt is not importable here: {type(e).__name__}: {e}".splitlines()[0])
    return registry, kt, runner


def test_the_host_names_the_plugin_uses_exist(sglang_kt) -> None:  # type: ignore[no-untyped-def]
    registry, kt, runner = sglang_kt
    params = list(inspect.signature(registry.register_moe_quant_wrapper).parameters)
    assert params[:4] == ["wrapper_id", "predicate", "factory", "priority"]
    assert callable(registry.is_wrapped_method) and callable(registry.maybe_wrap_moe_quant_method)
    method = kt.KTEPWrapperMethod
    assert method._quant_wrapper_id == "kt_ep"
    for name in ("apply", "create_weights", "process_weights_after_loading", "_update_gpu_experts_from_batch"):
        assert callable(getattr(method, name)), name
    assert list(inspect.signature(method.apply).parameters) == ["self", "layer", "dispatch_output"]
    assert "forward_batch" in inspect.signature(runner.ModelRunner.forward).parameters
    src = inspect.getsource(method.__init__) + inspect.getsource(method.create_weights)
    for attr in ("gpu_experts_mask", "logical_to_gpu_index", "gpu_index_to_logical", "num_gpu_experts",
                 "gpu_experts_mask_cuda", "logical_to_gpu_index_cuda", "global_num_experts"):
        assert f"self.{attr}" in src, attr


def test_importing_the_plugin_registers_it(sglang_kt) -> None:  # type: ignore[no-untyped-def]
    registry = sglang_kt[0]
    importlib.import_module("hybrimoe_kt.sglang")
    ids = {entry[1]: entry[0] for entry in registry._QUANT_WRAPPERS}
    assert ids.get("kt_ep") == 20 and ids.get("hybrimoe", 0) > 20
