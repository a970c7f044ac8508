"""The one generation loop every backend shares: vision → merge embeddings → prefill → decode with the KV cache.

A backend supplies the parts through `Runtime.run(part, inputs)` and a decoder session (`Runtime.decoder()`) that
owns its cache: `ExplicitCache` below for graphs that take and return the cache (ONNX, TensorRT, the PyTorch
reference), or a backend's own session when the cache lives inside the program (ExecuTorch). Everything else —
prompt ids, image placement, the position scheme, sampling, stopping, timing — happens here, in numpy.

    out = generate(runtime, image, "What colour is the circle?", max_new_tokens=8)
    out.tokens, out.text, out.timings["prefill_ms"], out.step_logits
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from vlsi_edge.runtimes import positions as P
from vlsi_edge.runtimes.preprocess import load_image


@dataclass
class Generation:
    tokens: list[int]
    text: str
    prompt_ids: np.ndarray
    timings: dict = field(default_factory=dict)      # preprocess/vision/prefill ms, decode_ms per step
    step_logits: list[np.ndarray] = field(default_factory=list)   # [V] float32 per generated token


@dataclass
class Sampling:
    """Greedy when `top_p` is None; nucleus sampling otherwise (seeded)."""

    top_p: float | None = None
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)

    def pick(self, logits: np.ndarray) -> int:
        if self.top_p is None:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / max(self.temperature, 1e-6)
        p = np.exp(z - z.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), self.top_p)) + 1]
        return int(self.rng.choice(keep, p=p[keep] / p[keep].sum()))


class ExplicitCache:
    """Decoder session for graphs with cache inputs/outputs (`past_key_values.N.key` → `present.N.key`) and a 2-D
    attention mask; the cache grows by concatenation inside the graph."""

    def __init__(self, runtime, model: dict, dtype=np.float32):
        self.runtime, self.model, self.dtype = runtime, model, dtype
        self.reset()

    def reset(self) -> None:
        m = self.model
        empty = np.zeros((1, m["num_kv_heads"], 0, m["head_dim"]), dtype=self.dtype)
        self.past = {f"past_key_values.{i}.{kv}": empty for i in range(m["num_layers"]) for kv in ("key", "value")}
        self.length = 0

    def __call__(self, embeds: np.ndarray, positions: np.ndarray, image_mask: np.ndarray | None = None) -> np.ndarray:
        n = embeds.shape[1]
        feeds = {"inputs_embeds": embeds.astype(self.dtype, copy=False),
                 "attention_mask": np.ones((1, self.length + n), dtype=np.int64),
                 "position_ids": positions, **self.past}
        if self.model.get("image_mask") == "bidirectional":   # Gemma3: image tokens see each other both ways
            marks = np.zeros((1, n), np.int64) if image_mask is None else image_mask.astype(np.int64)[None]
            feeds["token_type_ids"] = marks
        out = self.runtime.run("text_decoder", feeds)
        self.past = {k.replace("present.", "past_key_values."): v for k, v in out.items() if k.startswith("present.")}
        self.length += n
        return out["logits"][0]


def merge_prompt(model: dict, ids: np.ndarray, token_embeds: np.ndarray, image_embeds: np.ndarray):
    """The prefill's inputs: the prompt's token embeddings [1,S,D] with the image's rows written over its image
    tokens, their positions (the bundle's scheme), the position that follows, and the image-token mask [S]."""
    is_image = ids == model["image_token_id"]
    if is_image.sum() != image_embeds.shape[1]:
        raise ValueError(f"prompt holds {is_image.sum()} image tokens, the vision encoder made {image_embeds.shape[1]}")
    embeds = token_embeds.copy()
    embeds[0, is_image] = image_embeds[0]
    positions, next_pos = P.prompt_positions(ids, model["position_scheme"])
    return embeds, positions, next_pos, is_image


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def generate(runtime, image, prompt: str, max_new_tokens: int = 32, sampling: Sampling | None = None,
             stop_at_eos: bool = True, keep_logits: bool = False) -> Generation:
    """Answer `prompt` about `image` (a path, PIL image or uint8 [3,S,S] array) with the bundle's parts."""
    model = runtime.bundle.model
    sampling = sampling or Sampling()
    prompter = runtime.prompter
    timings: dict = {}

    t0 = time.perf_counter()
    pixels = image if isinstance(image, np.ndarray) else load_image(image, model["image_size"])
    ids = prompter.ids(prompt)
    timings["preprocess_ms"] = _ms(t0)

    t0 = time.perf_counter()
    image_embeds = runtime.run("vision_encoder", {"image": pixels[None]})["image_embeds"]
    timings["vision_ms"] = _ms(t0)

    t0 = time.perf_counter()
    tokens = runtime.run("token_embedding", {"input_ids": ids[None]})["inputs_embeds"]
    embeds, positions, next_pos, is_image = merge_prompt(model, ids, tokens, image_embeds)
    decoder = runtime.decoder()
    decoder.reset()
    logits = decoder(embeds, positions, is_image)[-1]
    timings["prefill_ms"] = _ms(t0)
    scheme = model["position_scheme"]

    tokens, step_logits, decode_ms = [], [], []
    eos = prompter.eos_ids
    while True:
        if keep_logits:
            step_logits.append(np.asarray(logits, dtype=np.float32))
        token = sampling.pick(logits)
        tokens.append(token)
        if (stop_at_eos and token in eos) or len(tokens) >= max_new_tokens:
            break
        t0 = time.perf_counter()
        emb = runtime.run("token_embedding", {"input_ids": np.array([[token]], dtype=np.int64)})["inputs_embeds"]
        logits = decoder(emb, P.step_positions(next_pos, 1, scheme))[-1]
        next_pos += 1
        decode_ms.append(_ms(t0))
    timings["decode_ms"] = decode_ms
    return Generation(tokens=tokens, text=prompter.decode(tokens), prompt_ids=ids, timings=timings,
                      step_logits=step_logits)
