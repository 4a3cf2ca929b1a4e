"""Every family: the tiny model with the stock, static and hybrimoe rules computes the same logits as the
unmodified transformers model within bf16 tolerance (the experts run in bf16 on the CPU kernels), and the
same greedy tokens wherever the unmodified model's choice is not a near-tie. The GPU tier is the CPU
stand-in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hybrimoe_kt.kt.families import FAMILIES
from hybrimoe_kt.kt.loader import load_hybrid
from hybrimoe_kt.kt.operators import HybriMoEExperts
from hybrimoe_kt.kt.tiny import load_model, make_tiny_model
from tests.kt.rule_files import RULE_NAMES

REPO = Path(__file__).resolve().parents[2]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: Path(make_tiny_model(f, root / f, seed=1)["dir"]) for f in FAMILIES}


def greedy(model, ids: torch.Tensor) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0].float()  # [T, V]


def check_close(got: list[int], want: list[int], ref_logits: torch.Tensor, new_logits: torch.Tensor,
                prompt_len: int, bf16_err: float, what: str) -> None:
    """``bf16_err``: how far the unmodified model itself moves when run in bf16 - the tolerance scale."""
    err = float((new_logits - ref_logits).norm() / ref_logits.norm())
    assert err < 1e-2 + 1.5 * bf16_err, f"{what}: logits relative error {err} (bf16 model: {bf16_err})"
    tol = 4 * float((new_logits - ref_logits).abs().max())
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:  # allowed only where the reference's top two are within the numerical noise
            top2 = ref_logits[prompt_len - 1 + i].topk(2).values
            assert float(top2[0] - top2[1]) <= tol, f"{what}: token {i} differs ({a} vs {b}) without a near-tie"
            break


def calibration_counts(base, tok, model_dir: Path) -> Path:
    """Routing counts [L, E] recorded on another prompt (what 'hybrimoe-kt record' gives), as a .npy."""
    from hybrimoe_kt.traces.recorder import record_trace

    path = model_dir / "calibration-counts.npy"
    if not path.exists():
        trace = record_trace(base, ["a lazy dog sleeps in the sun all day"], max_new_tokens=4, tokenizer=tok)
        np.save(path, trace.expert_counts())
    return path


def test_static_rules_without_counts_fail_with_the_fix(tiny_dirs: dict[str, Path]) -> None:
    rules = REPO / "optimize_rules" / "Mixtral-static.yaml"
    with pytest.raises(ValueError) as err:
        load_hybrid(tiny_dirs["mixtral"], rules, progress=False)
    msg = str(err.value)
    assert "static-frequency" in msg and "placement_counts" in msg and "hybrimoe-kt record" in msg


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rules_keep_greedy_tokens(family: str, tiny_dirs: dict[str, Path]) -> None:
    base, tok = load_model(tiny_dirs[family])
    ids = tok("the quick brown fox jumps over", return_tensors="pt").input_ids
    want = greedy(base, ids)
    full = torch.cat([ids, torch.tensor([want])], dim=1)
    ref_logits = logits(base, full)
    bf16_logits = logits(load_model(tiny_dirs[family], dtype=torch.bfloat16)[0], full)
    bf16_err = float((bf16_logits - ref_logits).norm() / ref_logits.norm())
    counts = calibration_counts(base, tok, tiny_dirs[family])
    for kind in ("stock", "static", "hybrimoe"):
        rules = REPO / "optimize_rules" / f"{RULE_NAMES[family]}-{kind}.yaml"
        over = {"placement_counts": str(counts)} if kind == "static" else None
        hm = load_hybrid(tiny_dirs[family], rules, progress=False, overrides=over)
        ops = [m for m in hm.model.modules() if isinstance(m, HybriMoEExperts)]
        assert ops and all(op.runtime is hm.runtime for op in ops)
        got = greedy(hm.model, ids)
        st = hm.runtime.stats
        assert st.forwards == len(ops) * NEW_TOKENS
        check_close(got, want, ref_logits, logits(hm.model, full), ids.shape[1], bf16_err,
                    f"{family} {rules.name}")
        if kind == "stock":
            assert st.gpu_experts == 0
        else:
            assert st.gpu_experts > 0


def test_experts_operator_alone(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The lighter operator that replaces only the block's experts module (the family's own router and
    shared expert stay) gives the same logits as the block operator."""
    family = "qwen2-moe"
    rules = tmp_path / "experts.yaml"
    rules.write_text(
        '- match:\n    name: "^model\\\\.layers\\\\.\\\\d+\\\\.mlp\\\\.experts$"\n'
        "    class: transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeExperts\n"
        "  replace:\n    class: hybrimoe_kt.kt.operators.HybriMoEExperts\n"
        "    kwargs: {cache_ratio: 0.25}\n")
    _, tok = load_model(tiny_dirs[family])
    ids = tok("the quick brown fox", return_tensors="pt").input_ids
    a = load_hybrid(tiny_dirs[family], rules, progress=False)
    b = load_hybrid(tiny_dirs[family], REPO / "optimize_rules" / "Qwen2-MoE-hybrimoe.yaml", progress=False)
    assert not any(type(m).__name__ == "HybriMoEBlock" for m in a.model.modules())
    la, lb = logits(a.model, ids), logits(b.model, ids)
    assert float((la - lb).norm() / lb.norm()) < 1e-2
