"""The kTransformers side of the hidden-state predictor hook (``kt.hidden_hook``): with the rule kwarg
``prefetch: hidden`` on a per-layer strategy, each MoE layer's predictor is the next MoE block's own
router on this layer's hidden state; the logits stay those of the same strategy without it. Tiny
models, the GPU tier on the CPU stand-in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hybrimoe_kt.kt.families import route
from hybrimoe_kt.kt.hidden_hook import router_block
from hybrimoe_kt.kt.loader import load_hybrid
from hybrimoe_kt.kt.operators import HybriMoEExperts
from hybrimoe_kt.kt.tiny import load_model, make_tiny_model
from tests.kt.rule_files import rule_file

HIDDEN = {"strategy": "hybrimoe-layer", "prefetch": "hidden", "cache_ratio": 0.5}
EXPERTS_RULE = ('- match:\n    name: "^model\\\\.layers\\\\.\\\\d+\\\\.mlp\\\\.experts$"\n'
                "    class: transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeExperts\n"
                "  replace:\n    class: hybrimoe_kt.kt.operators.HybriMoEExperts\n"
                "    kwargs: {cache_ratio: 0.5}\n")


NEW = 4


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0].float()


@pytest.mark.parametrize("family,operator", [("mixtral", "block"), ("deepseek-v2", "block"),
                                             ("qwen2-moe", "experts")])
def test_next_block_router_predicts_and_logits_stay(family: str, operator: str, tmp_path: Path) -> None:
    d = Path(make_tiny_model(family, tmp_path / family, seed=1)["dir"])
    if operator == "block":
        rules = rule_file(family, "hybrimoe")
    else:
        rules = tmp_path / "experts.yaml"
        rules.write_text(EXPERTS_RULE)
    _, tok = load_model(d)
    ids = tok("the quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    with_hook = load_hybrid(d, rules, progress=False, overrides=HIDDEN)
    without = load_hybrid(d, rules, progress=False, overrides={k: v for k, v in HIDDEN.items() if k != "prefetch"})
    rt = with_hook.runtime
    ops = sorted((m for m in with_hook.model.modules() if isinstance(m, HybriMoEExperts)), key=lambda m: m.moe_index)
    assert rt.spec.prefetch == "hidden" and len(ops) >= 2
    assert sorted(rt._next_router) == list(range(len(ops) - 1))
    assert without.runtime._next_router is None
    x = torch.randn(5, rt.store.hidden, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for op, nxt in zip(ops, ops[1:]):  # layer l's predictor chooses what layer l+1's router chooses
        block, spec = router_block(with_hook.model, nxt)
        got, want = rt._next_router[op.moe_index](x), route(block, x, spec)[0]
        assert torch.equal(got.sort(dim=-1).values, want.sort(dim=-1).values)
    assert float((logits(with_hook.model, ids) - logits(without.model, ids)).norm()) == 0.0  # prefill: no hook
    assert rt.hint_stats.calls == 0  # hybrimoe-layer queues no background copies in prefill: skipped
    outs = [m.generate(ids, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True)
            for m in (with_hook.model, without.model)]
    a, b = (torch.stack([t[0].float() for t in o.logits]) for o in outs)
    assert float((a - b).norm() / b.norm()) < 1e-2
    assert without.runtime.hint_stats.calls == 0
    assert rt.hint_stats.calls == (NEW - 1) * (len(ops) - 1)  # decode steps, every MoE layer but the last
