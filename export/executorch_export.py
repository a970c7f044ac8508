"""The phone target: the student as ONE ExecuTorch program `model.pte`, lowered to XNNPACK.

    manifest.update(write_program(vlm, Path("bundle"), {"vision_encoder": "fp32", "token_embedding": "int8",
                                                        "text_decoder": "8da4w"}, max_seq_len=512))

Methods (ExecuTorch's LLM runner contract, what `MultimodalRunner` calls by name):
- `vision_encoder(image u8 [1,3,S,S]) → [1,N,D']`, `token_embedding(ids i64 [1,T]) → [1,T,D']` (T dynamic);
- `text_decoder(embeds f32 [1,T,D'], cache_position i64 [T]) → logits f32 [1,T,V]`: exactly two inputs, the KV cache
  inside as mutable buffers (one `[1, kv_heads, max_seq_len, head_dim]` pair per layer), written at
  `cache_position`; the attention mask is made inside from `cache_position` (a query at position p sees cache slots
  0..p), so slots beyond the current position are never read and a sequence restarting at 0 needs no clearing.
  Logits come for every position: the runner samples the last row, the parity gate compares them all;
- constant methods `get_max_seq_len`, `get_max_context_len`, `get_eos_ids`, `use_kv_cache`, `enable_dynamic_shape`.

D' = D + extra columns, because the runner hands the decoder nothing but embeddings and a cache position:
- Qwen2-VL / Qwen2.5-VL (`mrope`, 3-D rotary positions): 3 columns (is_image, row, col on the merged grid); the
  vision part writes (1, r, c) for its tokens, the token embedding (0, 0, 0). The decoder rebuilds the positions:
  position = cache position - offset, where the offset grows by rows*cols - max(rows, cols) after each image's
  last token, and image token (r, c) takes (start, start + r, start + c). The running offset is a mutable buffer,
  reset by any call that starts at cache position 0.
- Gemma3 (image tokens attend to each other both ways): 1 column (is_image); an image arrives in one call, so the
  decoder opens the mask between the image tokens of each run in the call.
- every other family: none, D' = D.
The Python runtime strips and re-adds the columns (`runtimes/executorch_rt.py`), so its parts keep the generic
[1,T,D] interface.

Precisions (torchao, applied to copies of the modules before `torch.export`, strict): 8da8w / 8da4w =
`Int8DynamicActivationIntxWeightConfig` on every Linear (int8 per channel / int4 in groups of 32 with lm_head at
int8; HQQ scales), lowered to
XNNPACK's dynamically quantized linear; token_embedding int8 = `IntxWeightOnlyConfig` per row, fused into
`quantized_decomposed::embedding_byte` (a runtime needs ExecuTorch's quantized kernels: in Python
`import executorch.kernels.quantized`, which the MultimodalRunner binding shares).
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from vlsi_edge.errors import ModelError

PTE = "model.pte"
MROPE_COLUMNS = ("is_image", "row", "col")     # Qwen2-VL / Qwen2.5-VL: 3-D rotary positions
IMAGE_COLUMNS = ("is_image",)                   # Gemma3: bidirectional attention inside an image
GROUP_SIZE = 32          # 8da4w weight groups (ExecuTorch's default for its LLM export)
# Weight scales by HQQ (scale only), as ExecuTorch's LLM export does, and 8da4w keeps lm_head at 8 bits (the
# logits are what sampling and the gate see; llama.cpp's Q4 mixes keep the output matrix wider too). Measured on
# the briefly trained tiny students of six families, teacher-forced top-1 vs fp32: min/max scales + int4 lm_head
# 0.82-1.0, HQQ + 8-bit lm_head 0.94-1.0.
QPARAMS = "hqq_scale_only"
SUPPORTED = ("qwen2vl", "qwen2_5vl", "llava_onevision", "smolvlm", "internvl", "gemma3")


class StaticKV:
    """The cache object HF attention layers call (`update(k, v, layer_idx)`): writes the new K/V into the owner's
    buffers at `positions` and hands back the whole static buffers."""

    def __init__(self, owner: StaticCacheDecoder, positions: torch.Tensor):
        self.owner, self.positions = owner, positions

    def update(self, keys, values, layer_idx, *args, **kwargs):
        k_cache, v_cache = self.owner.kv(layer_idx)
        k_cache[:, :, self.positions] = keys           # index_put_ on a mutable buffer
        v_cache[:, :, self.positions] = values
        return k_cache, v_cache


class MropePositions(nn.Module):
    """(is_image, row, col) columns + cache positions → Qwen2-VL's 3-D rotary positions, with the running offset
    (cache position − rotary position of the next text token) kept in a buffer between calls."""

    def __init__(self, grid: tuple[int, int]):
        super().__init__()
        self.rows, self.cols = grid
        self.register_buffer("offset", torch.zeros(1, dtype=torch.int64), persistent=False)

    def forward(self, columns, cache_position):  # (T, 3) float, (T,) int64 -> (3, 1, T) int64
        cols = columns.to(torch.int64)
        flag, r, c = cols[:, 0], cols[:, 1], cols[:, 2]
        k = self.rows * self.cols
        j = r * self.cols + c                                                  # index inside the image
        grow = flag * (j == k - 1).to(torch.int64) * (k - max(self.rows, self.cols))
        offset = torch.where(cache_position[:1] == 0, torch.zeros_like(self.offset), self.offset)
        delta = offset + torch.cumsum(grow, 0) - grow                          # offset before each token
        t = cache_position - delta - j * flag
        self.offset.copy_(offset + grow.sum(0, keepdim=True))
        return torch.stack([t, t + r * flag, t + c * flag])[:, None, :]


class StaticCacheDecoder(nn.Module):
    """`text_decoder` for ExecuTorch: (embeds [1,T,D'], cache_position [T]) → logits [1,T,V], cache inside."""

    def __init__(self, vlm, max_seq_len: int, grid: tuple[int, int] | None, bidirectional: bool = False):
        super().__init__()
        from vlsi_edge.export.parts import head_dim

        cfg = vlm.text_config
        self.language_model, self.lm_head = vlm.language_model, vlm.lm_head
        self.hidden, self.max_seq_len = int(cfg.hidden_size), int(max_seq_len)
        self.num_layers = int(vlm.num_layers)
        shape = (1, int(cfg.num_key_value_heads), self.max_seq_len, head_dim(cfg))
        for i in range(self.num_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)
        self.mrope = MropePositions(grid) if grid else None
        self.bidirectional = bidirectional       # image tokens of one image see each other both ways (Gemma3)
        self.layer_types = sorted(set(getattr(cfg, "layer_types", None) or ["full_attention"]))
        self.sliding_window = getattr(cfg, "sliding_window", None)

    def kv(self, i: int):
        return getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")

    def _masks(self, cache_position, is_image):
        """Additive (1, 1, T, max_seq_len) mask; a dict per layer type when the model mixes sliding layers (a 4-D
        tensor is taken as-is by every family's mask builder, a dict only by those with sliding layers)."""
        slots = torch.arange(self.max_seq_len, dtype=torch.int64)
        seen = slots[None, :] <= cache_position[:, None]
        if is_image is not None:   # causal OR same image: an image arrives whole, so its block lies in this call
            previous = torch.cat([torch.zeros_like(is_image[:1]), is_image[:-1]])
            block = torch.cumsum(is_image * (1 - previous), 0) * is_image              # 1, 2, ... per image
            slot_block = torch.zeros(self.max_seq_len, dtype=torch.int64).index_put((cache_position,), block)
            seen = seen | ((block[:, None] > 0) & (slot_block[None, :] == block[:, None]))
        low = torch.finfo(torch.float32).min
        masks = {}
        for kind in self.layer_types:
            allowed = seen
            if kind == "sliding_attention" and self.sliding_window:
                allowed = seen & (slots[None, :] > cache_position[:, None] - self.sliding_window)
            masks[kind] = torch.where(allowed, 0.0, low)[None, None]
        return masks if len(masks) > 1 else masks["full_attention"]

    def forward(self, embeds, cache_position):  # (1, T, D'), (T,) -> (1, T, V)
        columns, embeds = embeds[0, :, self.hidden:], embeds[:, :, :self.hidden]
        if self.mrope is not None:
            position_ids = self.mrope(columns, cache_position)
        else:
            position_ids = cache_position[None]
        is_image = columns[:, 0].to(torch.int64) if self.bidirectional else None
        out = self.language_model(inputs_embeds=embeds, attention_mask=self._masks(cache_position, is_image),
                                  position_ids=position_ids, cache=StaticKV(self, cache_position), use_cache=True)
        return self.lm_head(out.last_hidden_state)


class WithColumns(nn.Module):
    """A part whose [1,N,D] output gets the extra columns appended: for an image (1, r, c) (mrope) or (1,)
    (bidirectional image attention), for text zeros."""

    def __init__(self, part: nn.Module, columns: tuple[str, ...], grid: tuple[int, int] | None, image: bool):
        super().__init__()
        self.part, self.image = part, image
        if image:
            rows, cols = grid
            index = torch.arange(rows * cols)
            values = {"is_image": torch.ones(rows * cols), "row": (index // cols).float(),
                      "col": (index % cols).float()}
            table = torch.stack([values[c] for c in columns], -1)[None]             # (1, N, C)
        else:
            table = torch.zeros(1, 1, len(columns))
        self.register_buffer("columns", table, persistent=False)

    def forward(self, x):
        out = self.part(x)                                                              # (1, N, D)
        extra = self.columns if self.image else self.columns.expand(1, out.shape[1], -1)
        return torch.cat([out, extra], dim=-1)


@contextlib.contextmanager
def export_patches(module: nn.Module):
    """Tracing workarounds, on only while exporting:
    - HF's eager attention (explicit matmul + additive mask + softmax): its SDPA path branches on the query length,
      which a dynamic sequence cannot guard on;
    - tanh-approximated GELU spelled out as tanh arithmetic: ExecuTorch 1.5.1's XNNPACK partitioner delegates
      `gelu(approximate="tanh")` as XNNPACK's exact (erf) GELU, ~1e-4 off per activation (Gemma3, SigLIP towers)."""
    from transformers.activations import GELUTanh

    configs = {id(m.config): m.config for m in module.modules()
               if hasattr(getattr(m, "config", None), "_attn_implementation")}
    saved = {k: c._attn_implementation for k, c in configs.items()}
    gelus = [m for m in module.modules()
             if isinstance(m, GELUTanh) or (isinstance(m, nn.GELU) and m.approximate == "tanh")]
    try:
        for c in configs.values():
            c._attn_implementation = "eager"
        for m in gelus:
            m.forward = _gelu_tanh
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]
        for m in gelus:
            del m.forward


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


def quantize(module: nn.Module, precision: str) -> nn.Module:
    """A quantized copy of `module` (the original keeps its float weights for the parity gate)."""
    if precision == "fp32":
        return module
    from torchao.quantization import quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig

    module = copy.deepcopy(module)
    if precision == "int8":         # token_embedding: weight-only int8 per row
        for m in module.modules():  # padding_idx only shapes gradients, and hides the embedding from the fusion
            if isinstance(m, nn.Embedding):
                m.padding_idx = None
        config = IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0),
                                      intx_choose_qparams_algorithm=QPARAMS)
        quantize_(module, config, filter_fn=lambda m, _: isinstance(m, nn.Embedding))
        return module
    int8 = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0),
                                                 intx_choose_qparams_algorithm=QPARAMS)
    if precision == "8da8w":
        quantize_(module, int8, filter_fn=lambda m, _: isinstance(m, nn.Linear))
        return module
    int4 = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP_SIZE),
                                                 intx_choose_qparams_algorithm=QPARAMS)
    quantize_(module, int4, filter_fn=lambda m, name: isinstance(m, nn.Linear) and name != "lm_head"
              and m.in_features % GROUP_SIZE == 0)
    quantize_(module, int8, filter_fn=lambda m, name: isinstance(m, nn.Linear) and (
        name == "lm_head" or m.in_features % GROUP_SIZE != 0))     # the rest: 8 bits
    return module


def _quantization_facts(precision: str) -> dict | None:
    """What a precision name means in this exporter (recorded per part in the manifest)."""
    if precision == "fp32":
        return None
    if precision == "int8":
        return {"weights": "int8 per row", "activations": "float", "scales": QPARAMS}
    facts = {"weights": "int8 per channel" if precision == "8da8w" else f"int4 in groups of {GROUP_SIZE}",
             "activations": "int8 per token, dynamic", "scales": QPARAMS, "library": "torchao"}
    if precision == "8da4w":
        facts["int8_layers"] = f"lm_head and linears whose input is not a multiple of {GROUP_SIZE}"
    return facts


def _export(module: nn.Module, example: tuple, dynamic=None):
    with torch.no_grad(), warnings.catch_warnings(), export_patches(module):
        warnings.simplefilter("ignore")
        return torch.export.export(module.eval(), example, dynamic_shapes=dynamic, strict=True)


def _nbytes(t: torch.Tensor) -> float:
    """Bytes a tensor occupies once lowered: torchao's quantized weights count their parts (values, scales, zero
    points), at the bits of their target dtype (int4 travels unpacked in int8 until XNNPACK packs it)."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        names, meta = t.__tensor_flatten__()
        bits = {torch.int4: 4}.get((meta or {}).get("target_dtype"))
        return sum(_nbytes(getattr(t, n)) * (bits / 8 if n == "qdata" and bits else 1) for n in names)
    return t.numel() * t.element_size()


def _weight_bytes(program) -> int:
    """Bytes of the weights and constants a method's graph reads, its mutable state (the KV cache) left out. The
    state dict also holds parameters of the wrapped model that the graph never touches (the decoder wrapper keeps
    the embedding table), so only tensors whose graph inputs have users count."""
    sig = program.graph_signature
    read = {n.name for n in program.graph.nodes if n.op == "placeholder" and n.users}
    bound = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    used = {name for node, name in bound.items() if node in read} - set(sig.buffers_to_mutate.values())
    constants = {name for node, name in sig.inputs_to_lifted_tensor_constants.items() if node in read}
    tensors = [t for name, t in program.state_dict.items() if name in used]
    tensors += [t for name, t in program.constants.items() if name in constants and isinstance(t, torch.Tensor)]
    return int(sum(_nbytes(t) for t in tensors))


def write_program(vlm, root: Path, precisions: dict, max_seq_len: int) -> dict:
    """Export, lower and save `root/model.pte`; returns the manifest entries (parts, decoder, runtime)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    from vlsi_edge.export import parts as PARTS

    if vlm.family not in SUPPORTED:
        raise ModelError(f"{vlm.family}: no ExecuTorch export for this family yet",
                         f"--target phone supports {', '.join(SUPPORTED)}; use --target onnx")
    scheme = PARTS.position_scheme(vlm)
    grid = tuple(scheme["grid"]) if scheme["kind"] == "mrope" else None
    bidirectional = vlm.family in PARTS.BIDIRECTIONAL_IMAGE_FAMILIES
    columns = MROPE_COLUMNS if grid else IMAGE_COLUMNS if bidirectional else ()
    extra = len(columns)
    hidden, size = int(vlm.hidden_size), int(vlm.image_size)

    from vlsi_edge.export.vision import build_vision_encoder

    vision, vmeta = build_vision_encoder(vlm)
    embedding = PARTS.TokenEmbedding(vlm.embed_tokens).eval()
    if columns:
        grid_or_line = grid or (1, int(vmeta["n_image_tokens"]))
        vision = WithColumns(vision, columns, grid_or_line, image=True)
        embedding = WithColumns(embedding, columns, None, image=False)
    decoder = StaticCacheDecoder(vlm, max_seq_len, grid, bidirectional).eval()

    seq = torch.export.Dim("seq", min=1, max=max_seq_len)
    image = torch.full((1, 3, size, size), 255, dtype=torch.uint8)
    ids = torch.arange(5, dtype=torch.int64)[None]
    embeds, cache_position = torch.zeros(1, 5, hidden + extra), torch.arange(5, dtype=torch.int64)
    programs = {
        "vision_encoder": _export(quantize(vision, precisions["vision_encoder"]), (image,)),
        "token_embedding": _export(quantize(embedding, precisions["token_embedding"]), (ids,), ({1: seq},)),
        "text_decoder": _export(quantize(decoder, precisions["text_decoder"]), (embeds, cache_position),
                                ({1: seq}, {0: seq})),
    }
    eos = PARTS.eos_token_ids(vlm)
    constants = {"get_max_seq_len": max_seq_len, "get_max_context_len": max_seq_len, "get_eos_ids": eos,
                 "use_kv_cache": True, "enable_dynamic_shape": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edge = to_edge_transform_and_lower(
            # one XNNPACK partitioner for fp32 and dynamically quantized ops alike (ExecuTorch's LLM export takes the
            # quantized linears one per partition first to bound peak memory; that doubles lowering time here)
            programs, partitioner={name: [XnnpackPartitioner()] for name in programs},
            constant_methods=constants, compile_config=EdgeCompileConfig(_check_ir_validity=False))
        program = edge.to_executorch(ExecutorchBackendConfig(
            extract_delegate_segments=True, do_quant_fusion_and_const_prop=True,
            # the KV cache (and the mrope offset) in their own arena: state that lives between calls
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass()))
    root = Path(root)
    (root / PTE).write_bytes(program.buffer)

    n_img = int(vmeta["n_image_tokens"])
    width = hidden + extra
    io = {
        "vision_encoder": (["image"], ["image_embeds"]),
        "token_embedding": (["input_ids"], ["inputs_embeds"]),
        "text_decoder": (["inputs_embeds", "cache_position"], ["logits"]),
    }
    parts = {name: {"file": PTE, "files": [PTE], "method": name, "precision": precisions[name],
                    "inputs": io[name][0], "outputs": io[name][1]} for name in programs}
    for name, part in parts.items():
        part["weight_bytes"] = _weight_bytes(programs[name])
        if (facts := _quantization_facts(precisions[name])) is not None:
            part["quantization"] = facts
    parts["vision_encoder"]["shapes"] = {"image": [1, 3, size, size], "image_embeds": [1, n_img, width]}
    parts["token_embedding"]["shapes"] = {"input_ids": [1, "T"], "inputs_embeds": [1, "T", width]}
    parts["text_decoder"]["shapes"] = {"inputs_embeds": [1, "T", width], "cache_position": ["T"],
                                       "logits": [1, "T", int(vlm.vocab_size)]}
    decoder_facts = {"cache": "internal", "max_seq_len": int(max_seq_len), "max_context_len": int(max_seq_len),
                     "position_input": "cache_position", "logits": "all_positions",
                     "extra_columns": list(columns), "eos_ids": eos}
    if bidirectional:
        decoder_facts["image_attention"] = "bidirectional within each image (the is_image column)"
    if grid:
        decoder_facts["mrope"] = {"grid": list(grid), "columns": list(MROPE_COLUMNS),
                                  "rule": "position = cache_position - offset; offset grows by rows*cols - "
                                          "max(rows, cols) after an image's last token; image token (r, c) gets "
                                          "(start, start + r, start + c); a call at cache position 0 resets it"}
    runtime = {"executorch": {"backend": "XnnpackBackend", "constant_methods": sorted(constants),
                              "image_input": {"dtype": "uint8", "shape": [1, 3, size, size]},
                              "kernels": ["portable", "quantized"] if "int8" in precisions.values() else ["portable"]}}
    return {"parts": parts, "decoder": decoder_facts, "runtime": runtime}
