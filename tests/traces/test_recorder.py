"""The recorder on tiny random-weight models of every supported transformers MoE family."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hybrimoe_kt.traces.recorder import RoutingRecorder, record_trace  # noqa: E402

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128)
MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
           first_k_dense_replace=1, n_shared_experts=1, moe_intermediate_size=32,
           **{**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4})


def _configs() -> dict:
    t = transformers
    return {
        "mixtral": lambda: t.MixtralConfig(num_local_experts=8, num_experts_per_tok=2, **COMMON),
        "qwen2_moe": lambda: t.Qwen2MoeConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                              shared_expert_intermediate_size=64, **COMMON),
        "qwen3_moe": lambda: t.Qwen3MoeConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                              **COMMON),
        "olmoe": lambda: t.OlmoeConfig(num_experts=8, num_experts_per_tok=2, **COMMON),
        "deepseek_v2": lambda: t.DeepseekV2Config(n_routed_experts=8, num_experts_per_tok=2, q_lora_rank=None,
                                                  **MLA),
        "deepseek_v3": lambda: t.DeepseekV3Config(n_routed_experts=8, num_experts_per_tok=2, q_lora_rank=16,
                                                  n_group=2, topk_group=1, **MLA),
    }


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]


def _model(family: str):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(_configs()[family]()).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_records_what_the_router_returned(family: str) -> None:
    model = _model(family)
    seen: dict[str, list] = {}

    def spy(name):
        def hook(module, inputs, output):
            seen.setdefault(name, []).append(set(map(tuple, np.sort(output[2].numpy(), axis=1).tolist())))
        return hook

    rec = RoutingRecorder(model)
    handles = [m.register_forward_hook(spy(n)) for n, m in rec.routers]
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    trace = record_trace(model, prompts, max_new_tokens=4)
    for h in handles:
        h.remove()
    assert trace.n_layers == 2 == len(rec.routers)  # DeepSeek: 3 layers, the first one dense
    assert trace.top_k == 2 and trace.n_experts == 8
    # per request: prompt rows (one prefill forward) + max_new_tokens - 1 decode forwards
    assert trace.n_tokens == (5 + 3) + (3 + 3)
    assert trace.requests() == [0, 1]
    fw = trace.forwards()
    assert [f.n_tokens for f in fw] == [5, 1, 1, 1, 3, 1, 1, 1]
    assert [f.is_prefill for f in fw] == [True, False, False, False] * 2
    # the recorded ids are exactly the router's outputs, forward by forward
    for layer, (name, _) in enumerate(rec.routers):
        for f, expected in zip(fw, seen[name]):
            got = set(map(tuple, np.sort(trace.experts[f.rows, layer], axis=1).tolist()))
            assert got == expected
    w = trace.weights.astype(np.float32)
    assert (w[..., 0] >= w[..., 1]).all()  # router order: highest weight first


def test_logits_only_router_falls_back_to_softmax_topk() -> None:
    model = _model("mixtral")
    rec = RoutingRecorder(model)
    hook = rec._hook(0)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0, 0.5, 0.2, 0.1]])
    hook(None, None, logits)
    ids, w = rec.calls[0][0]
    assert ids.tolist() == [[1, 3]] and w[0, 0] > w[0, 1]


def test_not_a_moe_model_is_a_clear_error() -> None:
    cfg = transformers.LlamaConfig(**{k: v for k, v in COMMON.items()})
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="no MoE router"):
        RoutingRecorder(model)
