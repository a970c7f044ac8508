"""Family registry and `load_model`: one adapter class per VLM family, filled by the `@register` decorator.

    from vlsi_edge.models import load_model
    m = load_model("builtin:tiny-qwen2vl-student")          # a preset, a local HF checkpoint dir, or a hub id
    m.family, m.num_layers, m.target_layers, m.hidden_states(batch, [2, 4])

A family adapter is the family-specific part, one class per family with no shared base class: `family`,
`model_types`, `DEFAULT_IMAGE_SIZE`, `LANGUAGE_MODEL` (the base-model attribute owning the decoder layers),
`classes(model_type) -> (model class, processor class)` and `tiny(spec, tokenizer) -> VLM`. Everything a caller
uses (layers, hidden states, lm_head, …) lives once in `vlm.VLM`, which composes the model with its adapter.
"""
from __future__ import annotations

import json
from pathlib import Path

from vlsi_edge.errors import ModelError

FAMILIES: dict[str, type] = {}
_MODEL_TYPES: dict[str, str] = {}
WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin")
_ADAPTER_MODULES = ("qwen2vl", "qwen2_5vl", "llava_onevision", "smolvlm", "internvl", "gemma3")


def register(cls: type) -> type:
    FAMILIES[cls.family] = cls
    for model_type in cls.model_types:
        _MODEL_TYPES[model_type] = cls.family
    return cls


def _import_adapters() -> None:
    import importlib

    for name in _ADAPTER_MODULES:
        try:
            importlib.import_module(f"vlsi_edge.models.{name}")
        except ModuleNotFoundError as e:  # an adapter not written yet must not break the others
            if e.name != f"vlsi_edge.models.{name}":
                raise


def supported_model_types() -> list[str]:
    _import_adapters()
    return sorted(_MODEL_TYPES)


def adapter_for_family(family: str) -> type:
    _import_adapters()
    if family not in FAMILIES:
        raise ModelError(f"unknown model family {family!r}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[family]


def adapter_for_model_type(model_type: str | None, where: str) -> type:
    _import_adapters()
    if model_type not in _MODEL_TYPES:
        raise ModelError(
            f"{where}: model_type {model_type!r} is not a supported VLM family; supported model types: "
            f"{', '.join(sorted(_MODEL_TYPES))}")
    return FAMILIES[_MODEL_TYPES[model_type]]


def load_model(spec: str, dtype: str = "float32", device: str = "cpu"):
    """A built-in preset (`builtin:NAME`), a local HF checkpoint folder, or a hub id (needs network) as a `VLM`."""
    from vlsi_edge.models.common import quiet_transformers
    from vlsi_edge.models.vlm import VLM

    quiet_transformers()
    spec = str(spec)
    if spec.startswith("builtin:"):
        from vlsi_edge.models import pretrained
        from vlsi_edge.models.presets import build_preset

        name = spec.removeprefix("builtin:")
        if pretrained.is_pretrained(name):
            folder = pretrained.checkpoint_dir(name)
            model_type = json.loads((folder / "config.json").read_text()).get("model_type")
            vlm = VLM.from_pretrained(adapter_for_model_type(model_type, str(folder)), folder, dtype=dtype,
                                      device=device)
            vlm.source = spec
            return vlm
        return build_preset(spec.removeprefix("builtin:"), dtype=dtype, device=device)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path} is a file; expected a checkpoint folder holding config.json",
                             "pass the folder, e.g. RUN/student")
        cfg = path / "config.json"
        if not cfg.is_file():
            raise ModelError(f"{path} has no config.json; expected a transformers checkpoint folder",
                             "pass a folder written by save_pretrained or `vlsi-edge train`, or builtin:NAME")
        try:
            model_type = json.loads(cfg.read_text()).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"{cfg} is not valid JSON ({e})") from None
        adapter = adapter_for_model_type(model_type, str(path))
        if not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES):
            raise ModelError(f"{path} holds no weights (expected model.safetensors, sharded model-*.safetensors with "
                             "their index, or pytorch_model.bin)", "pass the folder save_pretrained wrote in full")
        return VLM.from_pretrained(adapter, path, dtype=dtype, device=device)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return _load_hub(spec, dtype, device)
    raise ModelError(f"model {spec!r} not found: not a builtin preset, a folder, or a hub id",
                     "run `vlsi-edge inspect --list` for the built-in presets")


def _load_hub(repo_id: str, dtype: str, device: str):
    from transformers import AutoConfig

    from vlsi_edge.models.vlm import VLM

    try:
        config = AutoConfig.from_pretrained(repo_id)
    except Exception as e:  # network, auth, missing repo: one line for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"could not fetch {repo_id!r} from the hub ({first[:160]})",
                         "check the id and your network, or pass a local checkpoint folder") from None
    return VLM.from_pretrained(adapter_for_model_type(config.model_type, repo_id), repo_id, dtype=dtype, device=device)
