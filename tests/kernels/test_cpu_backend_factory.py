from __future__ import annotations

import logging
import sys

import pytest

from hybrimoe_kt.kernels.cpu_backend import default_threads, make_cpu_backend, physical_cores
from kernel_helpers import tiny_experts


def test_auto_falls_back_to_torch_and_logs_why(monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "kt_kernel", None)  # import kt_kernel.* now raises ImportError
    monkeypatch.setitem(sys.modules, "kt_kernel.kt_kernel_ext", None)
    with caplog.at_level(logging.INFO, logger="hybrimoe_kt.kernels.cpu_backend"):
        be = make_cpu_backend("auto", *tiny_experts(), 1)
    assert be.name == "torch"
    assert any("torch fallback" in r.message and "kt_kernel" in r.message for r in caplog.records)


def test_explicit_kt_kernel_without_it_is_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kt_kernel", None)
    monkeypatch.setitem(sys.modules, "kt_kernel.kt_kernel_ext", None)
    with pytest.raises(ValueError, match="torch"):
        make_cpu_backend("kt-kernel", *tiny_experts(), 1)


def test_unknown_kind_and_bad_threads() -> None:
    with pytest.raises(ValueError, match="unknown CPU backend 'cuda'"):
        make_cpu_backend("cuda", *tiny_experts(), 1)
    with pytest.raises(ValueError, match="n_threads"):
        make_cpu_backend("torch", *tiny_experts(), 0)


def test_torch_kind_and_default_threads() -> None:
    be = make_cpu_backend("torch", *tiny_experts())
    assert be.name == "torch" and be.n_threads == default_threads()
    assert default_threads() == max(1, physical_cores() - 1)


@pytest.mark.kt_kernel
def test_auto_picks_kt_kernel_when_importable(caplog: pytest.LogCaptureFixture) -> None:
    try:
        import kt_kernel.kt_kernel_ext  # noqa: F401
    except Exception as e:
        pytest.skip(f"kt-kernel extension not importable: {type(e).__name__}: {e}")
    with caplog.at_level(logging.INFO, logger="hybrimoe_kt.kernels.cpu_backend"):
        be = make_cpu_backend("auto", *tiny_experts(), 1, top_k=2)
    assert be.name == "kt-kernel"
    assert any("kt-kernel" in r.message for r in caplog.records)


@pytest.mark.kt_kernel
def test_auto_falls_back_on_a_shape_kt_kernel_cannot_run(caplog: pytest.LogCaptureFixture) -> None:
    try:
        import kt_kernel.kt_kernel_ext  # noqa: F401
    except Exception as e:
        pytest.skip(f"kt-kernel extension not importable: {type(e).__name__}: {e}")
    with caplog.at_level(logging.INFO, logger="hybrimoe_kt.kernels.cpu_backend"):
        be = make_cpu_backend("auto", *tiny_experts(h=40), 1)
    assert be.name == "torch"
    assert any("hidden=40" in r.message for r in caplog.records)
    with pytest.raises(ValueError, match="hidden=40"):
        make_cpu_backend("kt-kernel", *tiny_experts(h=40), 1)
