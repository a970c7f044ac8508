"""Gemma 3 adapter: `Gemma3ForConditionalGeneration` (SigLIP vision tower + Gemma3 text decoder) with the PIL
image processor, pan-and-scan off.

Image tokens: one 112-px image, patch 14 → 8×8 patches → average-pooled to `mm_tokens_per_image` = 4×4 = 16
`<image_soft_token>`s; the processor expands the `<start_of_image>` placeholder to
"\\n\\n<start_of_image>" + 16 × "<image_soft_token>" + "<end_of_image>\\n\\n".
Text quirks: the embedding module multiplies by sqrt(hidden_size) itself, so a pre-hook on decoder layer 0 sees
the scaled embeddings (== hidden_states[0]); image features are merged after that scaling, unscaled.
`final_logit_softcapping` is None (in transformers 5.24 `Gemma3ForConditionalGeneration` never applies it anyway,
only `Gemma3ForCausalLM` does), so `lm_head(hidden_states[-1]) == logits`.

    vlsi-edge inspect --model builtin:tiny-gemma3-student
"""
from __future__ import annotations

from vlsi_edge.models import common
from vlsi_edge.models.registry import register
from vlsi_edge.models.vlm import VLM

PATCH = 14
TOKENS_PER_SIDE = 4     # mm_tokens_per_image = 16; must divide the 8×8 patch grid of a 112-px image
GLOBAL_EVERY = 5        # every 5th text layer full attention, the others sliding (Gemma 3 itself: every 6th)
SLIDING_WINDOW = 512


def _classes():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor

    return Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor


@register
class Gemma3Adapter:
    family = "gemma3"
    model_types = ("gemma3",)
    DEFAULT_IMAGE_SIZE = 896  # Gemma 3's native SigLIP resolution; override with config.vlsi_edge.image_size
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
        head_dim = spec.hidden_size // spec.num_heads
        patches = spec.image_size // PATCH
        if patches % TOKENS_PER_SIDE:
            raise ValueError(f"gemma3: {spec.image_size} px / patch {PATCH} = {patches} patches per side is not a "
                             f"multiple of {TOKENS_PER_SIDE} image tokens per side")
        mm_tokens = TOKENS_PER_SIDE * TOKENS_PER_SIDE
        config = Config(
            text_config=dict(
                hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                num_key_value_heads=spec.num_kv_heads, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                vocab_size=padded_vocab(tokenizer, spec.vocab_multiple), max_position_embeddings=2048,
                sliding_window=SLIDING_WINDOW,
                layer_types=["full_attention" if (i + 1) % GLOBAL_EVERY == 0 else "sliding_attention"
                             for i in range(spec.num_layers)],
                final_logit_softcapping=None, attn_logit_softcapping=None,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=ids(tokenizer.eos_token),
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False),
            vision_config=dict(
                model_type="siglip_vision_model", hidden_size=spec.vision_hidden,
                intermediate_size=2 * spec.vision_hidden, num_hidden_layers=spec.vision_depth,
                num_attention_heads=spec.vision_heads, image_size=spec.image_size, patch_size=PATCH,
                num_channels=3, vision_use_head=False),
            mm_tokens_per_image=mm_tokens, boi_token_index=ids("<start_of_image>"),
            eoi_token_index=ids("<end_of_image>"), image_token_index=ids("<image_soft_token>"),
            tie_word_embeddings=False,
        )
        config.vlsi_edge = {"preset": spec.name, "target_layers": list(spec.target_layers),
                            "image_size": spec.image_size}
        image_processor = ImageProcessor(size={"height": spec.image_size, "width": spec.image_size},
                                         do_pan_and_scan=False)
        processor = Processor(image_processor=image_processor, tokenizer=tokenizer,
                              chat_template=tokenizer.chat_template, image_seq_length=mm_tokens)
        import torch

        with common.seeded(spec.seed):
            model = Model(config)
            # HF starts the image projection at zero, which makes a fresh preset blind to its images
            proj = model.model.multi_modal_projector.mm_input_projection_weight
            torch.nn.init.normal_(proj, std=config.text_config.initializer_range)
        model.generation_config.bos_token_id = config.text_config.bos_token_id
        model.generation_config.eos_token_id = config.text_config.eos_token_id
        model.generation_config.pad_token_id = config.text_config.pad_token_id
        return VLM(cls, model.eval(), processor, f"builtin:{spec.name}", list(spec.target_layers))

