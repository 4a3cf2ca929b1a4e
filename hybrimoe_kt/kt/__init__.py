"""Host integration: the optimize-rule engine (YAML rules that replace a model's modules with
operators), model skeleton loading and, later, MoE-block operators and the kTransformers adapter.

Import the submodules directly (``hybrimoe_kt.kt.rules``, ``hybrimoe_kt.kt.inject``); this package
imports nothing at start-up so that ``core`` users never pay for torch or transformers.
"""
