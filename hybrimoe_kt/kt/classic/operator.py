"""``KHybriMoEExperts``: the HybriMoE routed experts as a classic kTransformers experts operator.

kTransformers' MoE block operators (``KDeepseekV2MoE``, ``KQwen2MoeSparseMoeBlock``,
``KMistralSparseMoEBlock``, ...) treat their ``experts`` child as a kT experts operator only when it is
an instance of kT's ``KExpertsBase``, and kT loads every ``BaseInjectedModule`` through its ``load()``.
So the operator must subclass kT's own classes, which exist only where kT is installed: the class is
built on first use by ``operator_class()`` (``hybrimoe_kt.kt.classic.KHybriMoEExperts``, the dotted path
the rule files name, resolves through it), from ``ClassicExperts`` (the behaviour, defined here without
kT) and kT's ``BaseInjectedModule`` and ``KExpertsBase``, once per pair of base classes.

Behaviour (kT's experts contract):

- construction ``(key, gguf_loader, config, orig_module, prefill_device, generate_device, **kwargs)``
  validates the kwargs (``settings.py``) and joins the model's shared runtime (``registry.py``); it
  reads no weights (kT builds the model under meta);
- ``load()`` reads the layer's routed experts through kT's GGUF loader, quantized (``gguf_read.py``);
  the last layer to load builds the shared HybridMoE (one expert cache across layers);
- ``forward(x [N, H], expert_ids [N, k], weights [N, k])`` -> ``[N, H]`` on ``out_device``; the
  balance-serve form's ``bsz_tensor`` (rows that are real) and ``cuda_graph_idx`` are accepted;
- ``generate_experts.submit_for_one_decode(x, ids, w)`` / ``sync_for_one_decode()``: kT's blocks call
  them around their shared expert in decode. The whole layer (both tiers) runs in the submit and the
  sync returns its result: the runtime's CPU and GPU experts overlap each other inside the layer, but
  kT's shared expert runs after them, not beside the CPU kernel as with kT's own ``KExpertsCPU``;
- ``set_inference_mode(PREFILL | GENERATE | UNLOAD)`` (kT's ``InferenceState`` or its name) and
  ``unload()``: one runtime serves both phases, so PREFILL and GENERATE only load when needed;
  UNLOAD takes the layer out of the shared runtime until it loads again.

Under kTransformers' CUDA-graph capture (``--use_cuda_graph True``, local_chat's default) every call
raises one line asking for ``--use_cuda_graph False``: the runtime's graph-safe decode
(``runtime.graph_decode``) needs its host to run the cache upkeep between replays and report each
replay (``HybridMoE.graph_step`` / ``graph_replayed``, as ``kt/cuda_graph.py`` does), which kT's graph
runner does not.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch

from hybrimoe_kt.kt.classic import host
from hybrimoe_kt.kt.classic.gguf_read import read_layer_experts
from hybrimoe_kt.kt.classic.registry import model_runtime
from hybrimoe_kt.kt.classic.settings import KWARGS, OPERATOR, classic_settings

MODES = ("PREFILL", "GENERATE", "UNLOAD")
GRAPH_REFUSAL = (f"{OPERATOR} cannot run inside kTransformers' CUDA graph (its expert cache changes between "
                 f"decode steps, and kT's graph runner does not run the cache upkeep between replays): run "
                 f"with --use_cuda_graph False")


def _mode_name(mode: Any) -> str:
    name = str(getattr(mode, "name", mode)).upper()
    if name not in MODES:
        raise ValueError(f"inference mode must be one of {', '.join(MODES)} (kTransformers' InferenceState), "
                         f"got {mode!r}")
    return name


class DecodeOverlap:
    """kT's decode interface: ``submit_for_one_decode`` runs the layer, ``sync_for_one_decode`` returns
    its result (see the module docstring for what overlaps)."""

    def __init__(self, op: "ClassicExperts") -> None:
        self._op = weakref.ref(op)  # no cycle: the operator (and its layer's share of the runtime) frees promptly
        self.pending: Optional[torch.Tensor] = None

    @property
    def op(self) -> "ClassicExperts":
        op = self._op()
        if op is None:
            raise RuntimeError("the experts operator of this decode interface was freed")
        return op

    def submit_for_one_decode(self, input_tensor: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                              bsz_tensor: Optional[torch.Tensor] = None, cuda_graph_idx: int = 0) -> None:
        if self.pending is not None:
            raise RuntimeError(f"{self.op.key}: submit_for_one_decode called again before sync_for_one_decode")
        self.pending = self.op.forward(input_tensor, expert_ids, weights, bsz_tensor, cuda_graph_idx)

    def sync_for_one_decode(self, cuda_graph_idx: int = 0) -> torch.Tensor:
        if self.pending is None:
            raise RuntimeError(f"{self.op.key}: sync_for_one_decode without a submit_for_one_decode")
        out, self.pending = self.pending, None
        return out


class ClassicExperts:
    """The operator's behaviour; ``operator_class`` puts it in front of kT's base classes."""

    KWARGS = KWARGS
    _kt_bases: tuple[type, type] = ()  # (BaseInjectedModule, KExpertsBase), set by operator_class

    def __init__(self, key: str, gguf_loader: Any, config: Any, orig_module: torch.nn.Module,
                 prefill_device: str = "cuda", generate_device: str = "cuda", **kwargs: Any) -> None:
        s = classic_settings(key, kwargs, prefill_device, generate_device, host.cpu_infer())
        injected, experts_base = self._kt_bases
        injected.__init__(self, key, gguf_loader, config, orig_module, prefill_device, generate_device)
        experts_base.__init__(self, key, gguf_loader, config, orig_module, generate_device)
        n = len(orig_module) if hasattr(orig_module, "__len__") else 0
        n = n or int(getattr(config, "n_routed_experts", 0) or getattr(config, "num_local_experts", 0)
                     or getattr(config, "num_experts", 0) or 0)
        if n < 1:
            raise ValueError(f"{key}: cannot tell the number of routed experts (orig_module has no length and "
                             f"the config no n_routed_experts / num_local_experts / num_experts)")
        registry = model_runtime(gguf_loader, config, key)
        # kT's BaseInjectedModule sends unknown attribute names to orig_module: own state is set directly
        for name, value in (("settings", s.runtime), ("out_device", torch.device(s.out_device)),
                            ("layer_index", s.layer), ("n_experts", n), ("mode", "UNLOAD"),
                            ("is_loaded", False), ("runtime", None), ("moe_index", -1),
                            ("registry", registry), ("generate_experts", DecodeOverlap(self))):
            object.__setattr__(self, name, value)
        registry.join(self, s.layer, key, s.runtime)

    def _bind(self, runtime: Any, moe_index: int) -> None:
        object.__setattr__(self, "runtime", runtime)
        object.__setattr__(self, "moe_index", moe_index)

    def load(self, w: Any = None, device: Optional[str] = None, warmup: bool = False, mode: Any = None) -> None:
        """Read the layer's experts from the GGUF loader (once); kT calls it with no arguments."""
        if w is not None:
            raise ValueError(f"{self.key}: {OPERATOR} reads its experts from the GGUF loader; passing weights "
                             f"(w) is not supported")
        object.__setattr__(self, "mode", "GENERATE" if mode is None else _mode_name(mode))
        if self.mode == "UNLOAD":
            self.unload()
            return
        if not self.is_loaded:
            blocks = read_layer_experts(self.gguf_loader, self.layer_index, self.n_experts, self.key)
            object.__setattr__(self, "is_loaded", True)
            self.registry.loaded(self.layer_index, blocks)

    def unload(self) -> None:
        """Leave the shared runtime (it is rebuilt when every layer is loaded again)."""
        object.__setattr__(self, "mode", "UNLOAD")
        if self.is_loaded:
            object.__setattr__(self, "is_loaded", False)
            self.registry.leave_loaded(self.layer_index)

    def set_inference_mode(self, mode: Any) -> None:
        name = _mode_name(mode)
        if name == "UNLOAD":
            self.unload()
        else:
            self.load(mode=name)

    def forward(self, input_tensor: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                bsz_tensor: Optional[torch.Tensor] = None, cuda_graph_idx: int = 0) -> torch.Tensor:
        if host.capturing():
            raise RuntimeError(f"{self.key}: {GRAPH_REFUSAL}")
        if self.mode == "UNLOAD":
            raise RuntimeError(f"{self.key}: the experts are unloaded; call load() or "
                               f"set_inference_mode(InferenceState.GENERATE) before forward")
        runtime = self.runtime if self.runtime is not None else self.registry.runtime(self.key)
        one_row = input_tensor.dim() == 1  # kT's decode form: x [H], ids [k], weights [k]
        x = input_tensor[None] if one_row else input_tensor
        ids = expert_ids[None] if one_row else expert_ids
        w = weights[None] if one_row else weights
        rows = x.shape[0] if bsz_tensor is None else int(bsz_tensor.reshape(-1)[0])
        if not 0 <= rows <= x.shape[0]:
            raise ValueError(f"{self.key}: bsz_tensor says {rows} rows, the input has {x.shape[0]}")
        if rows < x.shape[0]:  # balance-serve pads the batch: only the first rows are real
            out = torch.zeros(x.shape, dtype=x.dtype, device=self.out_device)
            if rows:
                out[:rows] = runtime.forward(self.moe_index, x[:rows], ids[:rows], w[:rows]).to(self.out_device)
        else:
            out = runtime.forward(self.moe_index, x, ids, w).to(self.out_device)
        return out[0] if one_row else out

    def extra_repr(self) -> str:
        s = self.settings
        return (f"layer={self.layer_index}, strategy={s.strategy}, GPU tier={s.device}, out={self.out_device}, "
                f"mode={self.mode}")


_BUILT: dict[tuple[type, type], type] = {}


def operator_class() -> type:
    """``KHybriMoEExperts`` on the installed kTransformers' base classes (built once per pair of bases);
    ``host.ClassicHostMissing`` (one line) where classic kTransformers cannot be imported."""
    pair = host.bases(f"hybrimoe_kt.kt.classic.{OPERATOR}")
    cls = _BUILT.get(pair)
    if cls is None:
        cls = type(OPERATOR, (ClassicExperts, *pair), {
            "__module__": "hybrimoe_kt.kt.classic", "__qualname__": OPERATOR,
            "__doc__": "HybriMoE routed experts on kTransformers' experts contract (see "
                       "hybrimoe_kt.kt.classic.operator).", "_kt_bases": pair})
        _BUILT[pair] = cls
    return cls
