"""Trace specs on the command line: ``synthetic:PRESET`` (optionally ``synthetic:PRESET:REQUESTS``)
or a path to a trace file (NAME.npz, NAME.json or the stem)."""

from __future__ import annotations

from hybrimoe_kt.traces.format import Trace, load_trace

SYNTHETIC_PREFIX = "synthetic:"


def parse_trace_spec(spec: str, seed: int = 0) -> Trace:
    """Build the trace a spec names: a synthetic trace of a model preset, or a trace file."""
    if spec.startswith(SYNTHETIC_PREFIX):
        from hybrimoe_kt.traces.synthetic import synthetic_trace

        parts = spec[len(SYNTHETIC_PREFIX):].split(":")
        if not parts[0]:
            raise ValueError(f"trace spec {spec!r} names no model; use synthetic:PRESET, "
                             f"e.g. synthetic:mixtral-8x7b")
        if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise ValueError(f"trace spec {spec!r} is not synthetic:PRESET or synthetic:PRESET:REQUESTS")
        n_requests = int(parts[1]) if len(parts) == 2 else 4
        return synthetic_trace(parts[0], n_requests=n_requests, seed=seed)
    return load_trace(spec)
