"""The bounds must bound: ``roofline >= oracle >= every deployable strategy``, per cache ratio.

Checked on decode tok/s, prefill tok/s and hit rate of every record of a simulate run, with one
exception: the oracle minimises time, not misses, so its hit rate bounds nothing (``lru-offload``
copies every miss and so hits more often while running several times slower); the roofline's hit rate
(Belady over one global pool with perfect prefetch and free transfers) bounds every strategy's. A
violation is a bug in a bound (or in the simulator), never a result: ``check_bounds`` raises.
"""

from __future__ import annotations

from typing import Sequence

METRICS = ("decode_tok_s", "prefill_tok_s", "hit_rate")
NOT_BOUNDED = {"oracle": ("hit_rate",)}  # metrics a bound does not bound (see above)
ORDER = ("roofline", "oracle")  # each bounds the ones after it, and every deployable strategy
REL_TOL = 1e-9                  # float noise only


class BoundViolation(AssertionError):
    """A bound fell below what it bounds."""


def violations(records: Sequence[dict]) -> list[str]:
    """One line per violated inequality (empty when every bound holds)."""
    out: list[str] = []
    by_ratio: dict[float, dict[str, dict]] = {}
    for r in records:
        by_ratio.setdefault(r["cache_ratio"], {})[r["strategy"]] = r
    for ratio, recs in sorted(by_ratio.items()):
        bounds = [b for b in ORDER if b in recs]
        for i, b in enumerate(bounds):
            below = [n for n in recs if n not in ORDER] + bounds[i + 1:]
            for name in below:
                for m in METRICS:
                    if m in NOT_BOUNDED.get(b, ()):
                        continue
                    hi, lo = recs[b][m], recs[name][m]
                    if lo > hi * (1 + REL_TOL) + 1e-12:
                        out.append(f"cache {ratio:.0%}: {b} {m} {hi:.6g} < {name} {lo:.6g}")
    return out


def check_bounds(records: Sequence[dict]) -> None:
    """Raise ``BoundViolation`` naming every violated inequality."""
    bad = violations(records)
    if bad:
        raise BoundViolation("simulated bounds do not bound (a simulator bug; please report it with the "
                             "command): " + "; ".join(bad))
