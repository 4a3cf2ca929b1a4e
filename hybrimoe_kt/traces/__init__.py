"""Routing traces: the Trace type, reading/validating/writing trace files, statistics, a calibrated
synthetic generator and (with torch) a recorder for Hugging Face MoE models."""

from __future__ import annotations

from hybrimoe_kt.traces.format import Forward, Trace, load_trace, save_trace
from hybrimoe_kt.traces.validate import TraceError

__all__ = ["Forward", "Trace", "TraceError", "load_trace", "save_trace"]
