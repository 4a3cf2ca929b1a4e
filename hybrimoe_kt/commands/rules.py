"""``hybrimoe-kt rules check RULES.yaml --model-path DIR``: validate an optimize-rules file and show,
without loading weights or constructing operators, which module each rule matches in a model.

A rule that matches no module is a warning, as in kTransformers (exit 0); ``--strict`` makes it an
error (exit 2). A classic kTransformers rule file (``optimize_rules/classic/``) gets a warning-level
report: its schema is checked, and the classes that need the classic host are named with the command
that runs the file there (no model folder is needed for it)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("rules", help="work with optimize-rule files")
    actions = p.add_subparsers(dest="rules_command", metavar="ACTION")
    actions.required = True
    check = actions.add_parser("check", help="validate a rules file and show the modules each rule "
                                             "matches in a model (dry run, no weights)")
    check.add_argument("rules", help="optimize-rules YAML file")
    check.add_argument("--model-path", "--model_path", dest="model_path", default=None,
                       help="local Hugging Face model folder (config.json is enough); not needed for a "
                            "classic kTransformers rule file")
    check.add_argument("--default-device", default="cpu",
                       help="device recorded for rules that name none (default: cpu)")
    check.add_argument("--strict", action="store_true",
                       help="a rule that matches no module is an error (default: a warning, as in kTransformers)")
    check.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hybrimoe_kt.kt.classic.check import classic_report
    from hybrimoe_kt.kt.inject import apply_rules
    from hybrimoe_kt.kt.rules import load_rules
    from hybrimoe_kt.kt.skeleton import load_skeleton

    classic = classic_report(args.rules)
    if classic is not None:
        print(classic.format())
        return classic.exit_status
    if args.model_path is None:
        raise ValueError("--model-path is required: the model folder whose modules the rules are matched against")
    rules = load_rules(args.rules)
    model, config = load_skeleton(args.model_path)
    report = apply_rules(model, rules, config=config, default_device=args.default_device,
                         strict=args.strict, dry_run=True)
    print(report.format())
    unmatched = report.unmatched()
    print(f"\n{len(rules)} rule(s) OK, {len(report.injections)} module(s) matched in {args.model_path}"
          + (f"; {len(unmatched)} matched nothing (an error with --strict)" if unmatched else ""))
    return 0
