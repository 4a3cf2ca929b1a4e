"""hybrimoe-kt inside sglang-kt (the kvcache-ai SGLang fork that serves kt-kernel experts).

Load it with ``SGLANG_EXTERNAL_MODEL_PACKAGE=hybrimoe_kt.sglang python -m sglang.launch_server ...``:
sglang-kt's model registry imports this package (and each of its modules) in every process that
builds the model, and importing it registers our MoE wrapper (``plugin.register``) around kt's
``KTEPWrapperMethod``. Settings: ``hybrimoe_kt.sglang.settings``. The host's names it relies on are
all in ``hybrimoe_kt.sglang.host``. Importing ``hybrimoe_kt`` never imports this package.
"""

from __future__ import annotations

try:
    import sglang  # noqa: F401  (the host; the plugin has no use without it)
except ImportError:
    raise ImportError("hybrimoe_kt.sglang runs inside sglang-kt (the kvcache-ai SGLang fork), which is not "
                      "installed here; install it with kTransformers (pip install ktransformers) on a CUDA "
                      "machine, or use hybrimoe-kt's own host (hybrimoe-kt chat / serve)") from None

from hybrimoe_kt.sglang.plugin import register

register()
