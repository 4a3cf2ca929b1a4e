"""``hybrimoe-kt rules check RULES.yaml --model-path DIR``: validate an optimize-rules file and show,
without loading weights or constructing operators, which module each rule matches in a model."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("rules", help="work with optimize-rule files")
    actions = p.add_subparsers(dest="rules_command", metavar="ACTION")
    actions.required = True
    check = actions.add_parser("check", help="validate a rules file and show the modules each rule "
                                             "matches in a model (dry run, no weights)")
    check.add_argument("rules", help="optimize-rules YAML file")
    check.add_argument("--model-path", required=True,
                       help="local Hugging Face model folder (config.json is enough)")
    check.add_argument("--default-device", default="cpu",
                       help="device recorded for rules that name none (default: cpu)")
    check.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hybrimoe_kt.kt.inject import apply_rules
    from hybrimoe_kt.kt.rules import load_rules
    from hybrimoe_kt.kt.skeleton import load_skeleton

    rules = load_rules(args.rules)
    model, config = load_skeleton(args.model_path)
    report = apply_rules(model, rules, config=config, default_device=args.default_device,
                         strict=True, dry_run=True)
    print(report.format())
    print(f"\n{len(rules)} rule(s) OK, {len(report.injections)} module(s) matched in {args.model_path}")
    return 0
