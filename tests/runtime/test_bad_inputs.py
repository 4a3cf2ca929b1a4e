"""Bad inputs to the runtime raise one clear ValueError and leave its state untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrimoe_kt.runtime.device import Tier
from hybrimoe_kt.runtime.moe import HybridMoE
from hybrimoe_kt.runtime.store import HostExpertStore, LayerWeights
from tests.runtime.helpers import E, H, K, L, tiny_cost, tiny_store


@pytest.fixture(scope="module")
def moe() -> HybridMoE:
    return HybridMoE(tiny_store(), Tier("cpu"), "hybrimoe", 2, tiny_cost(), K,
                     counts=np.ones((L, E), dtype=np.int64), cpu_backend="torch", cpu_threads=1)


CASES = {
    "id out of range": (0, torch.zeros(1, H, dtype=torch.bfloat16), torch.tensor([[0, E]]), torch.ones(1, K) / K,
                        "topk_ids must be in"),
    "id out of range in a large batch": (0, torch.zeros(40, H, dtype=torch.bfloat16),
                                         torch.cat([torch.zeros(39, K, dtype=torch.long),
                                                    torch.tensor([[1, E + 3]])]), torch.ones(40, K) / K,
                                         "topk_ids must be in"),
    "negative id below -1": (0, torch.zeros(1, H, dtype=torch.bfloat16), torch.tensor([[0, -2]]),
                             torch.ones(1, K) / K, "topk_ids must be in"),
    "hidden size": (0, torch.zeros(1, H + 1, dtype=torch.bfloat16), torch.tensor([[0, 1]]), torch.ones(1, K) / K,
                    "hidden states must be"),
    "ids shape": (0, torch.zeros(2, H, dtype=torch.bfloat16), torch.tensor([[0, 1]]), torch.ones(1, K) / K,
                  "topk_ids must be"),
    "ids dtype": (0, torch.zeros(1, H, dtype=torch.bfloat16), torch.tensor([[0.0, 1.0]]), torch.ones(1, K) / K,
                  "int64 or int32"),
    "weights shape": (0, torch.zeros(1, H, dtype=torch.bfloat16), torch.tensor([[0, 1]]), torch.ones(1, K + 1),
                      "topk_weights must be"),
    "x dtype": (0, torch.zeros(1, H, dtype=torch.int32), torch.tensor([[0, 1]]), torch.ones(1, K) / K,
                "float tensor"),
    "layer": (L, torch.zeros(1, H, dtype=torch.bfloat16), torch.tensor([[0, 1]]), torch.ones(1, K) / K,
              "layer"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_value_error(moe: HybridMoE, case: str) -> None:
    layer, x, ids, w, msg = CASES[case]
    before = (dict(moe.pool.table), moe.cache.counters.accesses, moe.stats.forwards)
    with pytest.raises(ValueError, match=msg):
        moe.forward(layer, x, ids, w)
    assert (dict(moe.pool.table), moe.cache.counters.accesses, moe.stats.forwards) == before


def test_clairvoyant_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="needs the future"):
        HybridMoE(tiny_store(), Tier("cpu"), "oracle", 2, tiny_cost(), K, cpu_backend="torch")


def test_store_rejects_mismatched_shapes() -> None:
    good = tiny_store().layers[0]
    bad = LayerWeights(good.gate, good.up, good.down[:, :, :-1].contiguous())
    with pytest.raises(ValueError, match="same expert shapes"):
        HostExpertStore([good, bad])
    with pytest.raises(ValueError, match="bfloat16"):
        HostExpertStore([LayerWeights(good.gate.float(), good.up.float(), good.down.float())])
