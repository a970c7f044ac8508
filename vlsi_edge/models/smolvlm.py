"""SmolVLM / Idefics3 adapter: `SmolVLMForConditionalGeneration` (model_type "smolvlm", the tiny presets) or
`Idefics3ForConditionalGeneration` ("idefics3", e.g. SmolVLM-256M/500M checkpoints) — the same architecture: SigLIP
vision, pixel-shuffle connector, Llama text model (named `text_model` on the base model, not `language_model`).

Image splitting is off: the PIL image processor resizes every image to one S×S square (`size` and
`max_image_size` both `{"longest_edge": S}`), so one image is one tile. Vision patch 14, pixel-shuffle scale 2:
at S=112, (8×8)/4 = 16 `<image>` tokens, wrapped as `<fake_token_around_image><global-img>…<fake_token_around_image>`
(19 prompt tokens in all). The processor's `image_seq_len` equals the model's tokens per image.

    vlsi-edge inspect --model builtin:tiny-smolvlm-student
"""
from __future__ import annotations

from vlsi_edge.models import common
from vlsi_edge.models.registry import register
from vlsi_edge.models.vlm import VLM

PATCH_SIZE = 14
SCALE_FACTOR = 2


def _classes(model_type: str = "smolvlm"):
    if model_type == "idefics3":
        from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil,
                                  Idefics3Processor)

        return Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil

    return SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil, _processor_class_for()


def _tokens_per_image(config) -> int:
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 // config.scale_factor ** 2


def _processor_class_for():
    from transformers import SmolVLMProcessor

    return common.without_video(SmolVLMProcessor)


@register
class SmolVLMAdapter:
    family = "smolvlm"
    model_types = ("smolvlm", "idefics3")
    DEFAULT_IMAGE_SIZE = 512  # real checkpoints: one 512 px tile (SmolVLM2 / SmolVLM-256M); override via config
    LANGUAGE_MODEL = "text_model"  # the attribute of the base model that owns the decoder layers

    @staticmethod
    def classes(model_type: str | None = None) -> tuple[type, type]:
        _, model, _, processor = _classes(model_type or "smolvlm")
        return model, processor

    # construction -------------------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, spec, tokenizer):
        Config, Model, ImageProcessor, Processor = _classes("smolvlm")
        from vlsi_edge.models.presets import padded_vocab

        ids = tokenizer.convert_tokens_to_ids
        size = spec.image_size
        if size % (PATCH_SIZE * SCALE_FACTOR):
            raise ValueError(f"{spec.name}: image_size {size} is not a multiple of {PATCH_SIZE * SCALE_FACTOR}")
        config = Config(
            text_config=dict(
                model_type="llama", hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                num_key_value_heads=spec.num_kv_heads, vocab_size=padded_vocab(tokenizer, spec.vocab_multiple),
                max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
                bos_token_id=ids(tokenizer.bos_token), eos_token_id=ids(tokenizer.eos_token),
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False),
            vision_config=dict(
                hidden_size=spec.vision_hidden, intermediate_size=2 * spec.vision_hidden,
                num_hidden_layers=spec.vision_depth, num_attention_heads=spec.vision_heads, image_size=size,
                patch_size=PATCH_SIZE),
            scale_factor=SCALE_FACTOR, image_token_id=ids("<image>"), pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        config.vlsi_edge = {"preset": spec.name, "target_layers": list(spec.target_layers), "image_size": size}
        image_processor = ImageProcessor(do_image_splitting=False, size={"longest_edge": size},
                                         max_image_size={"longest_edge": size}, do_resize=True)
        processor = Processor(image_processor=image_processor, tokenizer=tokenizer,
                              image_seq_len=_tokens_per_image(config), chat_template=tokenizer.chat_template)
        with common.seeded(spec.seed):
            model = Model(config)
        model.generation_config.bos_token_id = config.text_config.bos_token_id
        model.generation_config.eos_token_id = config.text_config.eos_token_id
        model.generation_config.pad_token_id = config.text_config.pad_token_id
        return VLM(cls, model.eval(), processor, f"builtin:{spec.name}", list(spec.target_layers))


