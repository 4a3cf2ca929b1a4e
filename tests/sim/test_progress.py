"""Progress counts replayed steps, per fold, in-process and from forked workers; results are unchanged."""

from __future__ import annotations

import dataclasses

import pytest

from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.models import get_model
from hybrimoe_kt.sim import runner
from hybrimoe_kt.sim.folds import make_folds
from hybrimoe_kt.sim.progress import StepCounter, map_jobs
from hybrimoe_kt.traces.synthetic import synthetic_trace


class Bar:
    def __init__(self) -> None:
        self.n = 0
        self.updates: list[int] = []
        self.postfix = ""

    def update(self, n: int) -> None:
        self.n += n
        self.updates.append(n)

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s


_COUNTER: list[StepCounter] = []  # inherited by forked workers (a shared Value cannot be pickled)


def _square(x: int) -> int:
    _COUNTER[0].tick(x)
    return x * x


@pytest.mark.parametrize("workers", [1, 2])
def test_map_jobs_keeps_order_and_counts_ticks_across_processes(workers: int) -> None:
    bar = Bar()
    counter = StepCounter(bar, shared=workers > 1)
    _COUNTER[:] = [counter]
    done: list[int] = []
    out = map_jobs(_square, list(range(1, 6)), workers, counter, done.append)
    assert out == [1, 4, 9, 16, 25]
    assert bar.n == 15  # 1 + 2 + 3 + 4 + 5 steps, whichever process ran them
    assert done[-1] == 5


def test_counter_without_a_bar_is_silent() -> None:
    c = StepCounter(None, shared=True)
    c.tick(3)
    c.drain()


@pytest.fixture(scope="module")
def setup() -> runner.SimSetup:
    trace = synthetic_trace("mixtral-8x7b", n_requests=2, prompt_len=24, decode_len=12, seed=0)
    return runner.SimSetup(trace, "synthetic:mixtral-8x7b", get_model("mixtral-8x7b"),
                           dataclasses.replace(load_profile("rtx4090-ddr5"), gpu_mem_gib=0.0), host_cost="zero")


@pytest.mark.parametrize("workers", [1, 2])
def test_bar_counts_every_replayed_step_of_every_job(setup: runner.SimSetup, workers: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    bars: list[Bar] = []

    def fake_tqdm(total: int, **kw: object) -> Bar:
        b = Bar()
        b.total = total  # type: ignore[attr-defined]
        b.close = lambda: None  # type: ignore[attr-defined]
        bars.append(b)
        return b

    import tqdm
    monkeypatch.setattr(tqdm, "tqdm", fake_tqdm)
    names = ["stock", "lru-offload"]
    recs = runner.simulate(setup, names, [0.25], progress=True, workers=workers)
    steps = sum(len(f.steps) for f in make_folds(setup.trace, setup.prefill_chunk))
    (bar,) = bars
    assert bar.total == bar.n == 2 * steps  # type: ignore[attr-defined]
    assert len(bar.updates) >= 2
    plain = runner.simulate(setup, names, [0.25], progress=False, workers=1)
    assert recs == plain
