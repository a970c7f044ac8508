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

from pathlib import Path

import torch

from vlsi_edge.models import common
from vlsi_edge.models.registry import register

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

    def __init__(self, model, processor, source: str, target_layers=None):
        self.model, self.processor, self.source = model, processor, source
        meta = common.vlsi_meta(model.config)
        self.target_layers = list(target_layers or meta.get("target_layers")
                                  or common.default_target_layers(self.num_layers))
        self.image_size = int(meta.get("image_size", self.DEFAULT_IMAGE_SIZE))

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
        return cls(model.eval(), processor, f"builtin:{spec.name}", list(spec.target_layers))

    @classmethod
    def from_pretrained(cls, path, dtype="float32", device="cpu"):
        model_type = _model_type(path)
        _, Model, _, Processor = _classes(model_type)
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
        return self.model.model.text_model.norm

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.model.model.text_model.layers

    @property
    def embed_tokens(self) -> torch.nn.Embedding:
        return self.model.model.text_model.embed_tokens

    def hidden_states(self, batch: dict, layers: list[int]) -> dict[int, torch.Tensor]:
        """{k: (B, T, D)} for the requested layers only; layer num_layers is post-norm."""
        states, _ = common.hooked_hidden_states(
            lambda: self.model.model(**batch, use_cache=False), self.decoder_layers, self.final_norm,
            list(layers), self.num_layers)
        return states

    def image_token_count(self) -> int:
        return common.count_image_tokens(self.processor, self.image_size, self.model.config.image_token_id)


def _model_type(path) -> str:
    """model_type of a local folder or hub id (smolvlm unless the config says idefics3)."""
    local = Path(path)
    if local.is_dir():
        model_type = common.read_config_dict(local).get("model_type")
    else:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(path).model_type
    return "idefics3" if model_type == "idefics3" else "smolvlm"
