"""LLaVA-OneVision adapter: `LlavaOnevisionForConditionalGeneration` (SigLIP vision, Qwen2 text) with the PIL image
processor and no video slot.

Any-resolution tiling is off for the tiny presets: `image_grid_pinpoints=[[S, S]]` with the SigLIP tower at S px, so
every image becomes the base view plus one S×S patch (the minimum LLaVA-OV allows for a single image). At S=112,
patch 14: 8×8 base features + 8×8 patch features + 8 newline features = 136 image tokens for a square image. Any
input size is resized to the same two S×S views; a non-square image gets fewer tokens (the patch features are
unpadded to its aspect ratio), so square images first (`common.square_image`) where the count must be fixed.

    vlsi-edge inspect --model builtin:tiny-llava_onevision-student
"""
from __future__ import annotations

from vlsi_edge.models import common
from vlsi_edge.models.registry import register
from vlsi_edge.models.vlm import VLM


def _classes():
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessorPil)

    return LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessorPil, \
        _processor_class_for()


def _processor_class_for():
    from transformers import LlavaOnevisionProcessor

    return common.without_video(LlavaOnevisionProcessor)


@register
class LlavaOnevisionAdapter:
    family = "llava_onevision"
    model_types = ("llava_onevision",)
    DEFAULT_IMAGE_SIZE = 384  # real checkpoints: SigLIP at 384 px; override with config.vlsi_edge.image_size
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
        size, patch = spec.image_size, 14
        config = Config(
            text_config=dict(
                model_type="qwen2", hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                num_key_value_heads=spec.num_kv_heads, vocab_size=padded_vocab(tokenizer, spec.vocab_multiple),
                max_position_embeddings=2048, rope_theta=10000.0,
                bos_token_id=None, eos_token_id=ids(tokenizer.eos_token), pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=False),
            vision_config=dict(
                model_type="siglip_vision_model", hidden_size=spec.vision_hidden,
                intermediate_size=2 * spec.vision_hidden, num_hidden_layers=spec.vision_depth,
                num_attention_heads=spec.vision_heads, image_size=size, patch_size=patch, vision_use_head=False),
            image_token_index=ids("<image>"), video_token_index=ids("<video>"),
            image_grid_pinpoints=[[size, size]], vision_feature_layer=-1, vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False,
        )
        config.vlsi_edge = {"preset": spec.name, "target_layers": list(spec.target_layers), "image_size": size}
        image_processor = ImageProcessor(size={"height": size, "width": size}, image_grid_pinpoints=[[size, size]],
                                         do_pad=True)
        processor = Processor(image_processor=image_processor, tokenizer=tokenizer,
                              num_image_tokens=(size // patch) ** 2,
                              vision_feature_select_strategy=config.vision_feature_select_strategy,
                              vision_aspect_ratio=config.vision_aspect_ratio,
                              chat_template=tokenizer.chat_template)
        with common.seeded(spec.seed):
            model = Model(config)
        model.generation_config.eos_token_id = config.text_config.eos_token_id
        model.generation_config.pad_token_id = config.text_config.pad_token_id
        return VLM(cls, model.eval(), processor, f"builtin:{spec.name}", list(spec.target_layers))

