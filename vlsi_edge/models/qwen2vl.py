"""Qwen2-VL adapter: `Qwen2VLForConditionalGeneration` with the PIL image processor and no video slot.

Image tokens: the processor resizes to a multiple of patch 14 × merge 2 (28 px); 112 px → 4×4 = 16 tokens.

    vlsi-edge inspect --model builtin:tiny-qwen2vl-student
"""
from __future__ import annotations

from vlsi_edge.models import common
from vlsi_edge.models.registry import register
from vlsi_edge.models.vlm import VLM


def _classes():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    return Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil, common.without_video(
        Qwen2VLProcessor)


@register
class Qwen2VLAdapter:
    family = "qwen2vl"
    model_types = ("qwen2_vl",)
    DEFAULT_IMAGE_SIZE = 448  # real checkpoints: a fixed grid for export; override with config.vlsi_edge.image_size
    LANGUAGE_MODEL = "language_model"  # the attribute of the base model that owns the decoder layers
    resize_images = staticmethod(common.resize_qwen_images)  # any 28-px grid: `train --image-size`

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
        head_dim = spec.hidden_size // spec.num_heads
        half = head_dim // 2  # mrope sections (temporal, height, width) split the rotary half-dim
        config = Config(
            text_config=dict(
                hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                num_key_value_heads=spec.num_kv_heads, vocab_size=padded_vocab(tokenizer, spec.vocab_multiple),
                max_position_embeddings=2048, rope_theta=10000.0,
                rope_scaling={"type": "mrope", "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]},
                bos_token_id=None, eos_token_id=ids(tokenizer.eos_token), pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=False),
            vision_config=dict(depth=spec.vision_depth, embed_dim=spec.vision_hidden, hidden_size=spec.hidden_size,
                               num_heads=spec.vision_heads, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                               temporal_patch_size=2, in_channels=3),
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
            tie_word_embeddings=False,
        )
        config.vlsi_edge = {"preset": spec.name, "target_layers": list(spec.target_layers),
                            "image_size": spec.image_size}
        image_processor = ImageProcessor(**common.fixed_pixels(spec.image_size))
        processor = Processor(image_processor=image_processor, tokenizer=tokenizer,
                              chat_template=tokenizer.chat_template)
        with common.seeded(spec.seed):
            model = Model(config)
        model.generation_config.eos_token_id = config.text_config.eos_token_id
        model.generation_config.pad_token_id = config.text_config.pad_token_id
        return VLM(cls, model.eval(), processor, f"builtin:{spec.name}", list(spec.target_layers))

