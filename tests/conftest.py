"""Shared fixtures and markers. Markers: gpu, kt_kernel, slow (registered in pytest.ini)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_TRACES = REPO.parent / "shared" / "traces"
MIXTRAL_TRACE = SHARED_TRACES / "mixtral-8x7b-instruct__speculative-moe.npz"
QWEN_TRACE = SHARED_TRACES / "qwen1.5-moe-a2.7b-chat-gptq__vllm-expert-profiler__layer0.npz"


@pytest.fixture
def mixtral_trace_path() -> Path:
    if not MIXTRAL_TRACE.exists():
        pytest.skip(f"real Mixtral trace not found at {MIXTRAL_TRACE} (../shared/traces is absent)")
    return MIXTRAL_TRACE


@pytest.fixture
def qwen_trace_path() -> Path:
    if not QWEN_TRACE.exists():
        pytest.skip(f"real Qwen1.5 trace not found at {QWEN_TRACE} (../shared/traces is absent)")
    return QWEN_TRACE
