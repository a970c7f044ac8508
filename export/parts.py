"""The student split into the three parts of DESIGN.md, as export-friendly torch modules with their I/O contracts.

    parts = split_model(vlm)              # {"vision_encoder": Part, "token_embedding": Part, "text_decoder": Part}
    facts = model_facts(vlm)              # the manifest's "model" block: sizes, image tokens, position scheme

`text_decoder` here is the ONNX/TensorRT flavour: embeddings + attention mask + positions + the KV cache as
explicit inputs → logits + the grown cache, named after the onnx-community convention
(`past_key_values.N.key/.value` → `present.N.key/.value`); the sequence and cache lengths are dynamic. The
ExecuTorch flavour (static cache inside the program) lives in `executorch_export.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlsi_edge.models.chat import CHAT_FORMATS

MROPE_FAMILIES = ("qwen2vl", "qwen2_5vl")
BIDIRECTIONAL_IMAGE_FAMILIES = ("gemma3",)
MAX_SEQ = 4096


@dataclass
class Part:
    module: torch.nn.Module
    example: tuple                 # example inputs, in forward's order
    input_names: list[str]
    output_names: list[str]
    dynamic: tuple | None = None   # torch.export dynamic_shapes, matching `example`
    meta: dict = field(default_factory=dict)


def text_config(vlm):
    return vlm.text_config


def head_dim(cfg) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


class TokenEmbedding(torch.nn.Module):
    """ids [1, S] → embeddings [1, S, D] (family scaling, e.g. Gemma3's √D, included: it is the model's module)."""

    def __init__(self, embed: torch.nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids):
        return self.embed(input_ids)


class CachedTextDecoder(torch.nn.Module):
    """embeddings, attention mask, positions, past K/V per layer → logits, present K/V per layer."""

    def __init__(self, vlm):
        super().__init__()
        self.language_model, self.lm_head = vlm.language_model, vlm.lm_head
        self.config = vlm.text_config
        self.num_layers = vlm.num_layers

    def _cache(self, past):
        from transformers.cache_utils import DynamicCache

        return DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)],
                            config=self.config)

    def _run(self, inputs_embeds, attention_mask, position_ids, cache):
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, cache=cache, use_cache=True)
        present = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (self.lm_head(out.last_hidden_state), *present)

    def forward(self, inputs_embeds, attention_mask, position_ids, past):
        return self._run(inputs_embeds, attention_mask, position_ids, self._cache(past))


class BidirectionalImageDecoder(CachedTextDecoder):
    """Gemma3: image tokens attend to each other both ways. `token_type_ids` [1, S] marks them (1) at prefill and
    is all zeros when decoding, as transformers does; the masks are built here the way Gemma3Model builds them."""

    def forward(self, inputs_embeds, attention_mask, position_ids, token_type_ids, past):
        from transformers.models.gemma3.modeling_gemma3 import (
            create_masks_for_vision_model,
            get_block_sequence_ids_for_mask,
        )

        cache = self._cache(past)
        masks = create_masks_for_vision_model(self.config, inputs_embeds, attention_mask, cache, position_ids,
                                              get_block_sequence_ids_for_mask(token_type_ids))
        return self._run(inputs_embeds, masks, position_ids, cache)


def set_image_size(vlm, size: int) -> None:
    """Fix the export's image size. Qwen2-VL/Qwen2.5-VL take any multiple of patch × merge (the processor is set to
    that exact pixel count); the other families export at their tower's native size only."""
    from vlsi_edge.errors import UserError

    if size == vlm.image_size:
        return
    if vlm.family not in MROPE_FAMILIES:
        raise UserError(f"--image-size {size}: {vlm.family} exports at its vision tower's size only "
                        f"({vlm.image_size})", f"drop --image-size or pass {vlm.image_size}")
    vc = vlm.model.config.vision_config
    step = vc.patch_size * vc.spatial_merge_size
    if size <= 0 or size % step:
        raise UserError(f"--image-size {size} does not fit {vlm.family}'s patching",
                        f"expected a multiple of {step} (patch {vc.patch_size} × merge {vc.spatial_merge_size})")
    ip = vlm.processor.image_processor
    ip.min_pixels = ip.max_pixels = size * size
    ip.size = {"shortest_edge": size * size, "longest_edge": size * size}
    vlm.image_size = size


def position_scheme(vlm) -> dict:
    if vlm.family not in MROPE_FAMILIES:
        return {"kind": "linear"}
    vc = vlm.model.config.vision_config
    side = vlm.image_size // vc.patch_size // vc.spatial_merge_size
    return {"kind": "mrope", "grid": [side, side], "image_token_id": image_token_id(vlm)}


def image_token_id(vlm) -> int:
    cfg = vlm.model.config
    for name in ("image_token_id", "image_token_index"):
        if getattr(cfg, name, None) is not None:
            return int(getattr(cfg, name))
    raise ValueError(f"{vlm.family}: the config names no image token id")


def eos_token_ids(vlm) -> list[int]:
    eos = vlm.model.generation_config.eos_token_id
    return sorted({int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])})


def model_facts(vlm, n_image_tokens: int) -> dict:
    cfg = vlm.text_config
    return {
        "family": vlm.family,
        "hidden_size": int(cfg.hidden_size),
        "num_layers": int(vlm.num_layers),
        "num_kv_heads": int(cfg.num_key_value_heads),
        "head_dim": head_dim(cfg),
        "vocab_size": int(vlm.lm_head.weight.shape[0]),
        "image_size": int(vlm.image_size),
        "n_image_tokens": int(n_image_tokens),
        "image_token_id": image_token_id(vlm),
        "position_scheme": position_scheme(vlm),
        "image_mask": "bidirectional" if vlm.family in BIDIRECTIONAL_IMAGE_FAMILIES else "causal",
    }


def decoder_shapes(facts: dict, seq: int, past: int) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes of the ONNX text_decoder for `seq` new tokens after `past` cached ones (lint,
    TensorRT profiles, calibration)."""
    L, kvh, hd = facts["num_layers"], facts["num_kv_heads"], facts["head_dim"]
    mrope = facts["position_scheme"]["kind"] == "mrope"
    shapes = {"inputs_embeds": (1, seq, facts["hidden_size"]), "attention_mask": (1, past + seq),
              "position_ids": (3, 1, seq) if mrope else (1, seq)}
    if facts.get("image_mask") == "bidirectional":
        shapes["token_type_ids"] = (1, seq)
    for i in range(L):
        for kv in ("key", "value"):
            shapes[f"past_key_values.{i}.{kv}"] = (1, kvh, past, hd)
    return shapes


def prompt_template(vlm) -> str:
    """The generation prompt for one user turn with an image, rendered and expanded exactly as the family's HF
    processor expands it, with a `{prompt}` slot for the user's text."""
    from PIL import Image

    fmt = CHAT_FORMATS[vlm.family]
    text = fmt.render([("user", "{prompt}")], has_image=True, add_generation_prompt=True)
    blank = Image.new("RGB", (vlm.image_size, vlm.image_size), (255, 255, 255))
    ids = vlm.processor(text=[text], images=[[blank]], return_tensors="pt")["input_ids"][0].tolist()
    expanded = vlm.tokenizer.decode(ids, skip_special_tokens=False)
    if expanded.count("{prompt}") != 1:
        raise ValueError(f"{vlm.family}: the expanded template lost its prompt slot: {expanded!r}")
    return expanded


def generation_config(vlm) -> dict:
    """generation.json: the expanded prompt template, stop tokens and image token a device needs to prompt the
    parts."""
    return {"template": prompt_template(vlm), "eos_token_ids": eos_token_ids(vlm), "max_new_tokens": 32,
            "image_token_id": image_token_id(vlm)}


def split_model(vlm) -> dict[str, Part]:
    from vlsi_edge.export.vision import build_vision_encoder

    cfg = vlm.text_config
    vision, vmeta = build_vision_encoder(vlm)
    side = vlm.image_size
    image = torch.full((1, 3, side, side), 255, dtype=torch.uint8)

    ids = torch.arange(5, dtype=torch.int64)[None]
    seq = torch.export.Dim("seq", min=1, max=MAX_SEQ)
    embedding = Part(TokenEmbedding(vlm.embed_tokens).eval(), (ids,), ["input_ids"], ["inputs_embeds"],
                     dynamic=({1: seq},))

    L, kvh, hd = vlm.num_layers, int(cfg.num_key_value_heads), head_dim(cfg)
    s, p = 5, 3
    past = tuple(torch.zeros(1, kvh, p, hd) for _ in range(2 * L))
    mrope = vlm.family in MROPE_FAMILIES
    positions = torch.arange(p, p + s)[None]
    positions = positions[None].expand(3, 1, s).contiguous() if mrope else positions
    past_len = torch.export.Dim("past", min=1, max=MAX_SEQ)
    total = torch.export.Dim("total", min=2, max=2 * MAX_SEQ)
    kv_names = [f"{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    embeds, mask = torch.zeros(1, s, cfg.hidden_size), torch.ones(1, p + s, dtype=torch.int64)
    names = ["inputs_embeds", "attention_mask", "position_ids"]
    dims = [{1: seq}, {1: total}, {2 if mrope else 1: seq}]
    if vlm.family in BIDIRECTIONAL_IMAGE_FAMILIES:
        module, example = BidirectionalImageDecoder(vlm), (embeds, mask, positions,
                                                           torch.zeros(1, s, dtype=torch.int64), past)
        names.append("token_type_ids")
        dims.append({1: seq})
    else:
        module, example = CachedTextDecoder(vlm), (embeds, mask, positions, past)
    decoder = Part(module.eval(), example, names + [f"past_key_values.{n}" for n in kv_names],
                   ["logits"] + [f"present.{n}" for n in kv_names],
                   dynamic=(*dims, tuple({2: past_len} for _ in range(2 * L))))
    return {"vision_encoder": Part(vision.eval(), (image,), ["image"], ["image_embeds"], None, vmeta),
            "token_embedding": embedding, "text_decoder": decoder}
