"""The rule files of ``optimize_rules/classic/``: they parse with this package's rule parser against
kTransformers' classes (the ``fake_kt`` stand-ins), replace only each MoE layer's experts with the classic
operator in a module tree of kT's classes, and without kTransformers they give one clear line (loading)
or a warning-level report (``classic_report``) instead of "no module named 'ktransformers'"."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hybrimoe_kt.cli import main
from hybrimoe_kt.kt.classic import host
from hybrimoe_kt.kt.classic.check import classic_report
from hybrimoe_kt.kt.classic.settings import OPERATOR_PATH
from hybrimoe_kt.kt.inject import apply_rules
from hybrimoe_kt.kt.rules import ClassicHostNeeded, RuleError, load_rules

from . import fake_kt

CLASSIC = Path(__file__).resolve().parents[2] / "optimize_rules" / "classic"
# file -> (MoE block attribute, kT's modeling class of the block, kT's block operator)
FILES = {
    "DeepSeek-V2-Lite-Chat": ("mlp", "ktransformers.models.modeling_deepseek.DeepseekV2MoE",
                              "ktransformers.operators.experts.KDeepseekV2MoE"),
    "DeepSeek-V3-Chat": ("mlp", "ktransformers.models.modeling_deepseek_v3.DeepseekV3MoE",
                         "ktransformers.operators.experts.KDeepseekV3MoE"),
    "Qwen2-57B-A14B-Instruct": ("mlp", "ktransformers.models.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock",
                                "ktransformers.operators.experts.KQwen2MoeSparseMoeBlock"),
    "Qwen3-MoE": ("mlp", "ktransformers.models.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock",
                  "ktransformers.operators.experts.KQwen3MoeSparseMoeBlockV2"),
    "Mixtral": ("block_sparse_moe", "ktransformers.models.modeling_mixtral.MixtralSparseMoeBlock",
                "ktransformers.operators.experts.KMistralSparseMoEBlock"),
}


def test_every_classic_file_is_covered() -> None:
    assert sorted(p.stem for p in CLASSIC.glob("*.yaml")) == sorted(FILES)


def _class(path: str) -> type:
    mod, name = path.rsplit(".", 1)
    return getattr(__import__(mod, fromlist=[name]), name)


def kt_tree(block_attr: str, block_cls: type) -> torch.nn.Module:
    """A two-layer model of kT's classes: embeddings, attention, the MoE block with its experts, LM head."""
    root, model = torch.nn.Module(), torch.nn.Module()
    model.embed_tokens = torch.nn.Embedding(10, 8)
    layers = []
    for _ in range(2):
        layer, attn, block = torch.nn.Module(), torch.nn.Module(), block_cls()
        attn.q_proj, attn.kv_b_proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        block.gate = torch.nn.Linear(8, 4)
        block.experts = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8)) for _ in range(4))
        layer.self_attn = attn
        setattr(layer, block_attr, block)
        layers.append(layer)
    model.layers = torch.nn.ModuleList(layers)
    root.model, root.lm_head = model, torch.nn.Linear(8, 10)
    return root


@pytest.mark.parametrize("stem", sorted(FILES))
def test_rules_parse_and_replace_only_the_experts(stem: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_kt.install(monkeypatch)
    rules = load_rules(CLASSIC / f"{stem}.yaml")
    ours = [r for r in rules if r.replace_class_path == OPERATOR_PATH]
    assert len(ours) == 1 and ours[0].recursive is False
    assert ours[0].replace_class is _class(OPERATOR_PATH)
    assert ours[0].kwargs["prefill_device"] == ours[0].kwargs["generate_device"] == "cuda"
    others = {r.replace_class_path for r in rules} - {OPERATOR_PATH, "default"}
    assert others and all(p.startswith("ktransformers.") for p in others)

    block_attr, block_path, block_op = FILES[stem]
    report = apply_rules(kt_tree(block_attr, _class(block_path)), rules, dry_run=True, strict=False)
    by_name = {i.name: i for i in report.injections}
    experts = [n for n, i in by_name.items() if i.class_path == OPERATOR_PATH]
    assert experts == [f"model.layers.{i}.{block_attr}.experts" for i in range(2)]
    assert all(by_name[f"model.layers.{i}.{block_attr}"].class_path == block_op for i in range(2))
    assert not any(".experts." in n for n in by_name)  # recursive: False keeps kT's experts' children out
    emb = by_name["model.embed_tokens"]
    assert emb.action == "keep" and emb.kwargs["generate_device"] == "cpu"
    assert by_name["lm_head"].class_path == "ktransformers.operators.linear.KTransformersLinear"


@pytest.mark.parametrize("stem", sorted(FILES))
def test_header_gives_the_command(stem: str) -> None:
    header = "".join(line for line in (CLASSIC / f"{stem}.yaml").read_text().splitlines(True)
                     if line.startswith("#"))
    assert f"--optimize_config_path optimize_rules/classic/{stem}.yaml" in header
    assert "--cpu_infer" in header and "--gguf_path" in header and "--model_path" in header
    assert ("--use_cuda_graph False" in header) or ("--no-use_cuda_graph" in header)


@pytest.fixture
def no_kt() -> None:
    if host.available():
        pytest.skip("ktransformers is installed here; this checks a machine without it")


def test_loading_without_kt_is_one_clear_line(no_kt: None) -> None:
    with pytest.raises(ClassicHostNeeded) as e:
        load_rules(CLASSIC / "DeepSeek-V2-Lite-Chat.yaml")
    msg = str(e.value)
    assert "\n" not in msg and "no module named" not in msg.lower()
    assert "ktransformers.operators.experts.KDeepseekV2MoE" in msg and OPERATOR_PATH in msg
    assert "optimize_rules/classic/" in msg and "python -m ktransformers.local_chat" in msg
    assert "hybrimoe_kt.kt.classic.KHybriMoEExperts" in e.value.classes


@pytest.mark.parametrize("stem", sorted(FILES))
def test_classic_report_without_kt(stem: str, no_kt: None) -> None:
    path = CLASSIC / f"{stem}.yaml"
    report = classic_report(path)
    assert report is not None and report.exit_status == 0 and not report.host_available
    text = report.format()
    assert text.startswith("WARNING:") and OPERATOR_PATH in report.classes
    assert FILES[stem][2] in text and "--use_cuda_graph False" in text and "optimize_rules/classic/" in text


def test_classic_report_checks_the_schema(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- match: {name: '^model\\\\.layers\\\\..*\\\\.mlp\\\\.experts$'}\n"
                   f"  replace: {{class: {OPERATOR_PATH}, kwargs: {{slots: 3}}}}\n")
    with pytest.raises(RuleError, match=r"unknown kwargs \['slots'\]"):
        classic_report(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("- match: {class: ktransformers.models.modeling_mixtral.MixtralSparseMoeBlock}\n"
                    "  replce: {class: default}\n")
    with pytest.raises(RuleError, match="unknown key"):
        classic_report(typo)
    plain = tmp_path / "plain.yaml"
    plain.write_text("- match: {name: '^lm_head$'}\n")
    assert classic_report(plain) is None


def test_rules_check_command_names_the_classic_host(no_kt: None, mixtral_dir: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["rules", "check", str(CLASSIC / "Mixtral.yaml"), "--model-path", str(mixtral_dir)])
    out, err = capsys.readouterr()
    assert rc == 0 and err == "", err
    assert out.startswith("WARNING:") and "classic kTransformers rule file" in out
    assert OPERATOR_PATH in out and "optimize_rules/classic/" in out and "--use_cuda_graph False" in out
    assert "no module named" not in out.lower()
    rc = main(["rules", "check", str(CLASSIC / "Mixtral.yaml")])  # no model folder needed for it
    assert rc == 0 and "classic kTransformers rule file" in capsys.readouterr().out
