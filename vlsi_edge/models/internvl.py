"""InternVL adapter: HF-native `InternVLForConditionalGeneration` (InternViT + Qwen2 text backbone) with the PIL
GOT-OCR2 image processor, one tile per image and no video slot.

Image tokens: one 112-px tile, patch 14 → 8×8 patches (CLS dropped) → pixel shuffle by downsample_ratio 0.5 →
4×4 = 16 `<IMG_CONTEXT>` tokens between `<img>` and `</img>`. Tiling is off twice over: `crop_to_patches=False`
and `max_patches=1` on the image processor (`InternVLProcessor` passes `crop_to_patches=True` on every call, and
the image processor only tiles when `max_patches > 1`), so any input is resized to a single `image_size` square.

    vlsi-edge inspect --model builtin:tiny-internvl-student
"""
from __future__ import annotations

from pathlib import Path

import torch

from vlsi_edge.models import common
from vlsi_edge.models.registry import register

PATCH = 14
DOWNSAMPLE = 0.5


def _classes():
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration

    return InternVLConfig, InternVLForConditionalGeneration, GotOcr2ImageProcessorPil, _processor_class_for()


def _processor_class_for():
    from transformers import InternVLProcessor

    return common.without_video(InternVLProcessor)


@register
class InternVLAdapter:
    family = "internvl"
    model_types = ("internvl",)
    DEFAULT_IMAGE_SIZE = 448  # InternVL's native tile; override with config.vlsi_edge.image_size

    def __init__(self, model, processor, source: str, target_layers=None):
        self.model, self.processor, self.source = model, processor, source
        meta = common.vlsi_meta(model.config)
        self.target_layers = list(target_layers or meta.get("target_layers")
                                  or common.default_target_layers(self.num_layers))
        self.image_size = int(meta.get("image_size", self.DEFAULT_IMAGE_SIZE))

    # construction -------------------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, spec, tokenizer):
        Config, Model, ImageProcessor, Processor = _classes()
        from vlsi_edge.models.presets import padded_vocab

        ids = tokenizer.convert_tokens_to_ids
        grid = spec.image_size // PATCH
        image_seq_length = int(grid * DOWNSAMPLE) ** 2
        config = Config(
            text_config=dict(
                model_type="qwen2", hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                num_key_value_heads=spec.num_kv_heads, vocab_size=padded_vocab(tokenizer, spec.vocab_multiple),
                max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                bos_token_id=None, eos_token_id=ids(tokenizer.eos_token), pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=False),
            vision_config=dict(
                hidden_size=spec.vision_hidden, num_hidden_layers=spec.vision_depth,
                num_attention_heads=spec.vision_heads, intermediate_size=2 * spec.vision_hidden,
                image_size=spec.image_size, patch_size=PATCH, num_channels=3),
            image_token_id=ids("<IMG_CONTEXT>"), image_seq_length=image_seq_length, downsample_ratio=DOWNSAMPLE,
            vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False,
        )
        config.vlsi_edge = {"preset": spec.name, "target_layers": list(spec.target_layers),
                            "image_size": spec.image_size}
        image_processor = ImageProcessor(size={"height": spec.image_size, "width": spec.image_size},
                                         crop_to_patches=False, min_patches=1, max_patches=1)
        processor = Processor(image_processor=image_processor, tokenizer=tokenizer,
                              chat_template=tokenizer.chat_template, image_seq_length=image_seq_length)
        with common.seeded(spec.seed):
            model = Model(config)
        model.generation_config.eos_token_id = config.text_config.eos_token_id
        model.generation_config.pad_token_id = config.text_config.pad_token_id
        return cls(model.eval(), processor, f"builtin:{spec.name}", list(spec.target_layers))

    @classmethod
    def from_pretrained(cls, path, dtype="float32", device="cpu"):
        _, Model, _, Processor = _classes()
        model = Model.from_pretrained(path, dtype=common.resolve_dtype(dtype)).to(device).eval()
        processor = Processor.from_pretrained(path)
        return cls(model, processor, str(path))

    def to(self, dtype="float32", device="cpu"):
        self.model.to(dtype=common.resolve_dtype(dtype), device=device)
        return self

    def save_pretrained(self, path: str | Path) -> None:
        self.model.config.vlsi_edge = {**common.vlsi_meta(self.model.config),
                                       "target_layers": list(self.target_layers), "image_size": self.image_size}
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)

    # the interface ------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.processor.tokenizer

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
        return self.model.model.language_model.norm

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.model.model.language_model.layers

    @property
    def embed_tokens(self) -> torch.nn.Embedding:
        return self.model.model.language_model.embed_tokens

    def hidden_states(self, batch: dict, layers: list[int]) -> dict[int, torch.Tensor]:
        """{k: (B, T, D)} for the requested layers only; layer num_layers is post-norm."""
        states, _ = common.hooked_hidden_states(
            lambda: self.model.model(**batch, use_cache=False), self.decoder_layers, self.final_norm,
            list(layers), self.num_layers)
        return states

    def image_token_count(self) -> int:
        return common.count_image_tokens(self.processor, self.image_size, self.model.config.image_token_id)
