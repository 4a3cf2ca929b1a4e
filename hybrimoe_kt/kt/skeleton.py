"""A model's module tree without weights, from a local Hugging Face folder (config.json is enough).

The model is built on the ``meta`` device: every parameter has a shape and no storage, so matching
rules against the tree of a 100B-parameter model costs seconds and no memory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def load_config(model_dir: str | Path) -> Any:
    """The transformers config of ``model_dir``. Raises ValueError with the fix when the folder is
    missing, has no config.json, or names an architecture this transformers does not know."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model folder {model_dir} does not exist; pass --model-path DIR of a local "
                         f"Hugging Face model folder")
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"model folder {model_dir} has no config.json; pass a Hugging Face model "
                         f"folder (weights are not needed)")
    import json

    import transformers

    try:
        raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{model_dir}/config.json is not readable JSON: {e}") from e
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    try:
        return transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        if model_type and "recognize" in str(e):
            raise ValueError(f"{model_dir}/config.json: model_type {model_type!r} is unknown to "
                             f"transformers {transformers.__version__} (remote code is not run); "
                             f"use a model family transformers ships or upgrade it") from e
        raise ValueError(f"{model_dir}/config.json: cannot build a config with transformers "
                         f"{transformers.__version__}: {' '.join(str(e).split())[:300]}") from e


def load_skeleton(model_dir: str | Path) -> tuple[Any, Any]:
    """``(model, config)``: the causal-LM module tree of ``model_dir`` on the meta device."""
    import torch
    import transformers

    config = load_config(model_dir)
    try:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as e:
        arch = getattr(config, "architectures", None) or getattr(config, "model_type", "?")
        raise ValueError(f"{model_dir}: architecture {arch} is unknown to transformers "
                         f"{transformers.__version__} as a causal LM: "
                         f"{' '.join(str(e).split())[:300]}") from e
    log.debug("built %s on meta from %s", type(model).__name__, model_dir)
    return model, config
