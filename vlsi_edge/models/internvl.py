"""InternVL adapter: HF-native `InternVLForConditionalGeneration` (InternViT + Qwen2 text backbone) with the PIL
GOT-OCR2 image processor, one tile per image and no video slot.

Image tokens: one 112-px tile, patch 14 → 8×8 patches (CLS dropped) → pixel shuffle by downsample_ratio 0.5 →
4×4 = 16 `<IMG_CONTEXT>` tokens between `<img>` and `</img>`. Tiling is off twice over: `crop_to_patches=False`
and `max_patches=1` on the image processor (`InternVLProcessor` passes `crop_to_patches=True` on every call, and
the image processor only tiles when `max_patches > 1`), so any input is resized to a single `image_size` square.

    vlsi-edge inspect --model builtin:tiny-internvl-student
"""
from __future__ import annotations

from vlsi_edge.models import common
from vlsi_edge.models.registry import register
from vlsi_edge.models.vlm import VLM

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
    LANGUAGE_MODEL = "language_model"  # the attribute of the base model that owns the decoder layers

    @staticmethod
    def classes(model_type: str | None = None) -> tuple[type, type]:
        _, model, _, processor = _classes()
        return model, processor

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
        return VLM(cls, model.eval(), processor, f"builtin:{spec.name}", list(spec.target_layers))

