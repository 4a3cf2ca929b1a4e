"""MoE model families as data: where each transformers (5.x) family keeps its MoE block, router, routed
and shared experts, and how its router picks experts. ``route`` and ``expert_weights`` read a real block
through this table, so the HybriMoE operator needs no per-family class.

Facts checked against transformers 5.24 (``modeling_<family>.py``):

- Every family's MoE block sits at ``model.model.layers[i].mlp``, holds the router at ``.gate`` and the
  routed experts at ``.experts``. The router's ``forward(hidden [N, H])`` returns
  ``(logits [N, E], top-k weights [N, k], top-k ids [N, k])``; its weight is ``gate.weight [E, H]``.
- Routed experts are one module with fused 3-D parameters: ``experts.gate_up_proj [E, 2I, H]`` (rows
  ``[:I]`` are the gate projection, ``[I:]`` the up projection; ``is_concatenated=True``,
  ``is_transposed=False``) and ``experts.down_proj [E, H, I]``; an expert computes
  ``down @ (silu(gate @ x) * (up @ x))``. Older per-expert layouts (a ModuleList of MLPs) are read too.
  The experts' forward dispatches on ``config._experts_implementation`` ("grouped_mm" by default in
  5.24, "eager" loops over experts); the weight layout is the same for every implementation.
- Router semantics differ (see ``RouterSpec``): softmax over all experts then top-k (Mixtral always
  renormalises the k weights; Qwen2-MoE, Qwen3-MoE and OLMoE when ``norm_topk_prob``); DeepSeek-V2 takes a
  softmax, optionally limits the choice to the best ``topk_group`` of ``n_group`` groups (group score =
  max), never renormalises and multiplies by ``routed_scaling_factor``; DeepSeek-V3 takes a sigmoid, adds
  ``e_score_correction_bias`` for the choice only, keeps the best ``topk_group`` groups (group score = sum
  of its two best biased scores), gathers the unbiased scores, renormalises when ``norm_topk_prob`` and
  multiplies by ``routed_scaling_factor``.
- Shared experts: Qwen2-MoE ``.shared_expert`` (an MLP of ``shared_expert_intermediate_size``) scaled by
  ``sigmoid(.shared_expert_gate(x))`` ([1, H] linear); DeepSeek-V2/V3 ``.shared_experts`` (an MLP of
  ``moe_intermediate_size * n_shared_experts``), added unscaled. Mixtral, Qwen3-MoE and OLMoE have none.
- DeepSeek's first ``first_k_dense_replace`` layers have a dense MLP instead of a MoE block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping, Optional, get_args

Family = Literal["mixtral", "qwen2-moe", "qwen3-moe", "deepseek-v2", "deepseek-v3", "olmoe"]


@dataclass(frozen=True, slots=True)
class RouterSpec:
    """How a router turns logits into (ids, weights). Attribute names refer to the router module."""

    score: Literal["softmax", "sigmoid"]
    renormalize: Literal["always", "never", "norm_topk_prob"]  # "norm_topk_prob": when that flag is set
    groups: Literal["none", "max", "top2sum"]  # grouped top-k: group score = max / sum of best two
    group_switch: Optional[str] = None          # router attribute that enables grouping ("topk_method")
    scaling_attr: Optional[str] = None          # multiply the k weights by this router attribute
    bias_attr: Optional[str] = None             # score correction added for the choice only
    fp32_logits: bool = False                   # logits computed in fp32 (else in the hidden dtype)
    renorm_eps: float = 0.0                     # added to the sum of the k weights before dividing


@dataclass(frozen=True, slots=True)
class FamilySpec:
    name: str
    model_type: str          # config.model_type
    config_class: str        # transformers class names
    model_class: str
    moe_block_class: str
    router_class: str
    experts_class: str
    router: RouterSpec
    n_experts_attr: str      # config attribute with the routed expert count
    expert_intermediate_attr: str
    shared_attr: Optional[str] = None       # block attribute of the shared expert MLP
    shared_gate_attr: Optional[str] = None  # block attribute of the shared expert's sigmoid gate
    first_dense_attr: Optional[str] = None  # config attribute: number of leading dense layers
    gguf_arch: str = ""                     # llama.cpp architecture name
    router_attr: str = "gate"
    experts_attr: str = "experts"
    mlp_attr: str = "mlp"


_SOFTMAX_NORM = RouterSpec("softmax", "norm_topk_prob", "none")

FAMILIES: Mapping[str, FamilySpec] = {
    f.name: f
    for f in (
        FamilySpec("mixtral", "mixtral", "MixtralConfig", "MixtralForCausalLM", "MixtralSparseMoeBlock",
                   "MixtralTopKRouter", "MixtralExperts", RouterSpec("softmax", "always", "none"),
                   "num_local_experts", "intermediate_size", gguf_arch="llama"),
        FamilySpec("qwen2-moe", "qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                   "Qwen2MoeSparseMoeBlock", "Qwen2MoeTopKRouter", "Qwen2MoeExperts", _SOFTMAX_NORM,
                   "num_experts", "moe_intermediate_size", shared_attr="shared_expert",
                   shared_gate_attr="shared_expert_gate", gguf_arch="qwen2moe"),
        FamilySpec("qwen3-moe", "qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                   "Qwen3MoeSparseMoeBlock", "Qwen3MoeTopKRouter", "Qwen3MoeExperts", _SOFTMAX_NORM,
                   "num_experts", "moe_intermediate_size", gguf_arch="qwen3moe"),
        FamilySpec("deepseek-v2", "deepseek_v2", "DeepseekV2Config", "DeepseekV2ForCausalLM",
                   "DeepseekV2Moe", "DeepseekV2TopkRouter", "DeepseekV2Experts",
                   RouterSpec("softmax", "never", "max", group_switch="topk_method",
                              scaling_attr="routed_scaling_factor", fp32_logits=True),
                   "n_routed_experts", "moe_intermediate_size", shared_attr="shared_experts",
                   first_dense_attr="first_k_dense_replace", gguf_arch="deepseek2"),
        FamilySpec("deepseek-v3", "deepseek_v3", "DeepseekV3Config", "DeepseekV3ForCausalLM",
                   "DeepseekV3MoE", "DeepseekV3TopkRouter", "DeepseekV3Experts",
                   RouterSpec("sigmoid", "norm_topk_prob", "top2sum", scaling_attr="routed_scaling_factor",
                              bias_attr="e_score_correction_bias", fp32_logits=True,
                              renorm_eps=1e-20),
                   "n_routed_experts", "moe_intermediate_size", shared_attr="shared_experts",
                   first_dense_attr="first_k_dense_replace", gguf_arch="deepseek2"),
        FamilySpec("olmoe", "olmoe", "OlmoeConfig", "OlmoeForCausalLM", "OlmoeSparseMoeBlock",
                   "OlmoeTopKRouter", "OlmoeExperts", _SOFTMAX_NORM, "num_experts", "intermediate_size",
                   gguf_arch="olmoe"),
    )
}

assert set(FAMILIES) == set(get_args(Family))


def get_family(name: str) -> FamilySpec:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_of(model_or_config: Any) -> FamilySpec:
    """The family of a transformers model or config, by ``config.model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for spec in FAMILIES.values():
        if spec.model_type == model_type:
            return spec
    raise ValueError(f"model type {model_type!r} is not a supported MoE family; "
                     f"known: {', '.join(f.model_type for f in FAMILIES.values())}")


def moe_blocks(model: Any) -> Iterator[tuple[int, Any]]:
    """(layer index, MoE block) for every decoder layer whose MLP is a MoE block (dense ones skipped)."""
    spec = family_of(model)
    for i, layer in enumerate(model.model.layers):
        block = getattr(layer, spec.mlp_attr)
        if type(block).__name__ == spec.moe_block_class:
            yield i, block


def _attr(module: Any, name: Optional[str], default: Any = None) -> Any:
    return default if name is None else getattr(module, name, default)


def route(block: Any, hidden: Any, spec: Optional[FamilySpec] = None) -> tuple[Any, Any]:
    """Top-k expert ids [N, k] int64 and fp32 weights [N, k] of ``hidden`` [..., H], computed from the
    router's weight with the family's rule. Rows are ordered by weight, highest first. Weights stay
    fp32: in a bf16 model the Qwen2-MoE, Qwen3-MoE and OLMoE routers round theirs to bf16."""
    import torch

    spec = spec or _spec_of_block(block)
    rs = spec.router
    gate = getattr(block, spec.router_attr)
    x = hidden.reshape(-1, gate.weight.shape[-1])                                # [N, H]
    if rs.fp32_logits:
        logits = x.float() @ gate.weight.float().t()                             # [N, E]
    else:
        logits = (x @ gate.weight.to(x.dtype).t()).float()
    scores = logits.sigmoid() if rs.score == "sigmoid" else logits.softmax(dim=-1)
    bias = _attr(gate, rs.bias_attr)
    choice = scores + bias.float() if bias is not None else scores
    n_group = getattr(gate, "num_group", None)
    grouped = rs.groups != "none" and n_group and (
        rs.group_switch is None or getattr(gate, rs.group_switch) == "group_limited_greedy")
    if grouped:
        n_exp = choice.shape[-1]
        per_group = choice.view(-1, n_group, n_exp // n_group)                   # [N, G, E/G]
        if rs.groups == "max":
            group_score = per_group.max(dim=-1).values
        else:
            group_score = per_group.topk(2, dim=-1).values.sum(dim=-1)
        keep = group_score.topk(gate.topk_group, dim=-1).indices                 # [N, topk_group]
        mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
        mask = mask.unsqueeze(-1).expand_as(per_group).reshape(-1, n_exp)
        # "max" (DeepSeek-V2) zeroes the scores of dropped groups, so with k larger than the kept
        # experts it picks zero-weight experts; "top2sum" (DeepSeek-V3) never picks a dropped expert
        choice = choice.masked_fill(~mask, 0.0 if rs.groups == "max" else float("-inf"))
    ids = choice.topk(gate.top_k, dim=-1).indices                                # [N, k]
    weights = scores.gather(1, ids)
    if grouped and rs.groups == "max":
        weights = weights.masked_fill(~mask.gather(1, ids), 0.0)
    if rs.renormalize == "always" or (rs.renormalize == "norm_topk_prob" and gate.norm_topk_prob):
        weights = weights / (weights.sum(dim=-1, keepdim=True) + rs.renorm_eps)
    scale = _attr(gate, rs.scaling_attr)
    if scale is not None:
        weights = weights * scale
    order = weights.argsort(dim=-1, descending=True, stable=True)
    return ids.gather(1, order).long(), weights.gather(1, order).float()


def block_spec(block: Any) -> FamilySpec:
    """The family of a MoE block module, by its class name."""
    return _spec_of_block(block)


def _spec_of_block(block: Any) -> FamilySpec:
    name = type(block).__name__
    for spec in FAMILIES.values():
        if spec.moe_block_class == name:
            return spec
    raise ValueError(f"{name} is not a known MoE block class; known: "
                     f"{', '.join(f.moe_block_class for f in FAMILIES.values())}")


def expert_weights(block: Any, dtype: Any = None) -> tuple[Any, Any, Any]:
    """Stacked routed expert weights of a MoE block: gate [E, I, H], up [E, I, H], down [E, H, I],
    contiguous copies in ``dtype`` (default bfloat16)."""
    spec = _spec_of_block(block)
    return stacked_expert_weights(getattr(block, spec.experts_attr), dtype)


def stacked_expert_weights(experts: Any, dtype: Any = None) -> tuple[Any, Any, Any]:
    """The same from a routed-experts module itself (the module an experts operator replaces)."""
    import torch

    dtype = torch.bfloat16 if dtype is None else dtype
    if hasattr(experts, "gate_up_proj"):
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        if getattr(experts, "is_transposed", False):                             # [E, H, 2I], [E, I, H]
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        inter = gate_up.shape[1] // 2
        if getattr(experts, "is_concatenated", True):
            gate, up = gate_up[:, :inter], gate_up[:, inter:]
        else:                                                                    # rows interleave g, u
            gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
    else:                                                                        # ModuleList of MLPs
        names = ("gate_proj", "up_proj", "down_proj") if hasattr(experts[0], "gate_proj") else ("w1", "w3", "w2")
        gate, up, down = (torch.stack([getattr(e, n).weight.detach() for e in experts]) for n in names)
    return tuple(t.to(dtype).contiguous() for t in (gate, up, down))  # type: ignore[return-value]


def shared_expert_weights(block: Any, dtype: Any = None) -> Optional[tuple[Any, Any, Any, Optional[Any]]]:
    """The shared expert of a block as gate [Is, H], up [Is, H], down [H, Is] and its sigmoid gate
    weight [1, H] (None when the family adds it unscaled); None for families without one."""
    import torch

    spec = _spec_of_block(block)
    mlp = _attr(block, spec.shared_attr)
    if mlp is None:
        return None
    dtype = torch.bfloat16 if dtype is None else dtype
    gate_lin = _attr(block, spec.shared_gate_attr)
    weights = [getattr(mlp, n).weight.detach().to(dtype).contiguous()
               for n in ("gate_proj", "up_proj", "down_proj")]
    gate_w = None if gate_lin is None else gate_lin.weight.detach().to(dtype).contiguous()
    return weights[0], weights[1], weights[2], gate_w
