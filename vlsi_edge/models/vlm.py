"""`VLM`: a loaded vision-language model behind the one small interface every caller uses (DESIGN.md).

It composes the HF model, its processor, and the family adapter (the family-specific part: config classes, tiny
presets, where the language model lives). Nothing here depends on the family beyond the adapter's
`LANGUAGE_MODEL` attribute name and its `classes(model_type)`.

    m = load_model("builtin:tiny-qwen2vl-student")
    m.family, m.num_layers, m.hidden_size, m.vocab_size, m.target_layers, m.image_token_count()
    states = m.hidden_states(batch, [2, m.num_layers])      # {layer: (B, T, D)}; the last is post-norm
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from vlsi_edge.models import common


class VLM:
    def __init__(self, adapter: type, model, processor, source: str, target_layers=None):
        self.adapter, self.model, self.processor, self.source = adapter, model, processor, source
        meta = common.vlsi_meta(model.config)
        self.target_layers = list(target_layers or meta.get("target_layers")
                                  or common.default_target_layers(self.num_layers))
        self.image_size = int(meta.get("image_size", adapter.DEFAULT_IMAGE_SIZE))

    @classmethod
    def from_pretrained(cls, adapter: type, path, dtype: str = "float32", device: str = "cpu") -> "VLM":
        model_type = None
        if Path(path).is_dir():
            model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
        model_cls, processor_cls = adapter.classes(model_type)
        model = model_cls.from_pretrained(path, dtype=common.resolve_dtype(dtype)).to(device).eval()
        return cls(adapter, model, processor_cls.from_pretrained(path), str(path))

    def to(self, dtype: str = "float32", device: str = "cpu") -> "VLM":
        self.model.to(dtype=common.resolve_dtype(dtype), device=device)
        return self

    def set_image_size(self, image_size: int) -> None:
        """Feed the model `image_size` square images from now on; saved with it (config and processor)."""
        from vlsi_edge.errors import ModelError

        resize = getattr(self.adapter, "resize_images", None)
        if resize is None:
            raise ModelError(f"{self.source}: a {self.family} vision tower has a fixed input size "
                             f"({self.image_size} px); only Qwen2-VL and Qwen2.5-VL take another resolution",
                             "drop --image-size")
        resize(self.processor, image_size)
        self.image_size = image_size

    def save_pretrained(self, path: str | Path) -> None:
        self.model.config.vlsi_edge = {**common.vlsi_meta(self.model.config),
                                       "target_layers": list(self.target_layers), "image_size": self.image_size}
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)

    # the interface ------------------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def language_model(self) -> torch.nn.Module:
        return getattr(self.model.model, self.adapter.LANGUAGE_MODEL)

    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    @property
    def lm_head(self) -> torch.nn.Linear:
        return self.model.lm_head

    @property
    def final_norm(self) -> torch.nn.Module:
        return self.language_model.norm

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.language_model.layers

    @property
    def embed_tokens(self) -> torch.nn.Embedding:
        return self.language_model.embed_tokens

    def hidden_states(self, batch: dict, layers: list[int]) -> dict[int, torch.Tensor]:
        """{k: (B, T, D)} for the requested layers only, by hooks; layer num_layers is post-norm."""
        states, _ = common.hooked_hidden_states(
            lambda: self.model.model(**batch, use_cache=False), self.decoder_layers, self.final_norm,
            list(layers), self.num_layers)
        return states

    def image_token_count(self) -> int:
        return common.count_image_tokens(self.processor, self.image_size, self.model.config.image_token_id)

    def __repr__(self) -> str:
        return f"VLM({self.family}, {self.source}, {self.num_layers} layers x {self.hidden_size})"
