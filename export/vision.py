"""The `vision_encoder` part: one fixed-size uint8 RGB image in, the projected image embeddings out.

Contract (DESIGN.md, "Part I/O contracts"): the input is what ExecuTorch's MultimodalRunner hands the method, an
already resized image `(1, 3, S, S)` uint8 NCHW with S = `vlm.image_size` (`vlsi_edge.runtimes.preprocess.load_image`
makes it on a device). Rescaling, mean/std normalisation (the values of the family's image processor) and patching
happen inside the part. The output `(1, N, D)` float32 is exactly what the model writes at its N image-token
positions for that image on the host path (`data.collate.Collator` → HF processor → model), D the text hidden size.

    from vlsi_edge.export.vision import build_vision_encoder
    module, meta = build_vision_encoder(load_model("builtin:tiny-qwen2vl-student"))
    torch.export.export(module, (torch.zeros(meta["input"]["shape"], dtype=torch.uint8),), strict=True)

Each family's module calls the original vision layers, connector and projector directly (shared weights), so no
output-capturing hooks run and nothing depends on the data: for the one image size everything the HF code derives
from `grid_thw`, `image_sizes` or masks (rotary tables, window order and masks, position ids) is a buffer computed
here. Tiling / image splitting / pan-and-scan are off: one image is one view of S×S pixels.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vlsi_edge.errors import ModelError

# torch.onnx.export keyword arguments that export every family's part (the dynamo exporter, no patches needed)
ONNX_EXPORT = {"dynamo": True, "opset_version": 18}
_BUILDERS: dict[str, Callable] = {}


def _family(name: str):
    def register(fn):
        _BUILDERS[name] = fn
        return fn
    return register


def build_vision_encoder(vlm) -> tuple[nn.Module, dict]:
    """`(module, meta)` for `vlm`'s vision part at its fixed image size; `module(image)` maps a
    `(1, 3, S, S)` uint8 tensor to `(1, N, hidden)` float32 image embeddings."""
    if vlm.family not in _BUILDERS:
        raise ModelError(f"no vision_encoder export for family {vlm.family!r}", f"supported: {sorted(_BUILDERS)}")
    size = vlm.image_size
    tower, notes = _BUILDERS[vlm.family](vlm.model.model, size)
    device = next(tower.parameters()).device
    module = VisionEncoder(Normalize.from_processor(vlm.processor.image_processor), tower).to(device).eval()
    n_tokens = vlm.image_token_count()
    if tower.n_tokens != n_tokens:
        raise ModelError(f"{vlm.family}: the processor inserts {n_tokens} image tokens for a {size}x{size} image, "
                         f"the vision_encoder part makes {tower.n_tokens}",
                         "the processor must keep an image_size square image as one view (no resize, tiling or "
                         "splitting); check the image processor config against config.vlsi_edge.image_size")
    meta = {
        "family": vlm.family,
        "input": {"name": "image", "dtype": "uint8", "shape": [1, 3, size, size], "layout": "NCHW"},
        "output": {"name": "image_embeds", "dtype": "float32", "shape": [1, n_tokens, vlm.hidden_size]},
        "n_image_tokens": n_tokens,
        "image_size": size,
        "onnx_export": dict(ONNX_EXPORT),
        "notes": [f"fixed image size {size}x{size}; the device resizes (bicubic), the part normalises"] + notes,
    }
    return module, meta


class Normalize(nn.Module):
    """uint8 pixels → the processor's float input: `(x * rescale_factor - mean) / std` per channel."""

    def __init__(self, scale: float, mean, std):
        super().__init__()
        self.scale = float(scale)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_processor(cls, ip) -> Normalize:
        scale = ip.rescale_factor if ip.do_rescale else 1.0
        mean, std = (ip.image_mean, ip.image_std) if ip.do_normalize else (0.0, 1.0)
        return cls(scale, _per_channel(mean), _per_channel(std))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (image.to(torch.float32) * self.scale - self.mean) / self.std


def _per_channel(value) -> list[float]:
    return [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]


class VisionEncoder(nn.Module):
    """Normalise, then the family's tower (in the tower's dtype); the exported `vision_encoder` method."""

    def __init__(self, normalize: Normalize, tower: nn.Module):
        super().__init__()
        self.normalize, self.tower = normalize, tower
        self.dtype = next(tower.parameters()).dtype

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # (1, 3, S, S) uint8 -> (1, N, D) float32
        return self.tower(self.normalize(image).to(self.dtype)).to(torch.float32)


# Qwen2-VL, Qwen2.5-VL ----------------------------------------------------------------------------------------------
class QwenTower(nn.Module):
    """Qwen2-VL / Qwen2.5-VL vision tower and merger for one fixed grid.

    The processor patchifies the image into rows of (C, T, p, p) pixels ordered by 2×2 merge block, the image
    repeated over T temporal frames; Conv3d with kernel == stride is a matmul over those rows. Here a precomputed
    index gathers the same rows straight from the normalised image, and a Linear holding the Conv3d weight summed
    over T (the T frames are equal) replaces the convolution: no 3-D conv, no 8-D permute (STACK.md). Attention is
    over the whole sequence (one image) or, for Qwen2.5-VL's windowed blocks, under a precomputed block mask in the
    window order; the rows and rotary tables are permuted into that order at build time and the merged tokens
    permuted back at the end.
    """

    def __init__(self, visual, size: int):
        super().__init__()
        p, m = visual.config.patch_size, visual.spatial_merge_size
        if size % (p * m):
            raise ModelError(f"image_size {size} is not a multiple of patch {p} x merge {m}",
                             f"set config.vlsi_edge.image_size to a multiple of {p * m}")
        grid = size // p
        grid_thw = torch.tensor([[1, grid, grid]])
        proj = visual.patch_embed.proj
        embed, channels = proj.weight.shape[:2]
        self.patch_proj = nn.Linear(channels * p * p, embed, bias=proj.bias is not None,
                                    dtype=proj.weight.dtype, device=proj.weight.device)
        with torch.no_grad():
            self.patch_proj.weight.copy_(proj.weight.float().sum(dim=2).reshape(embed, -1))
            if proj.bias is not None:
                self.patch_proj.bias.copy_(proj.bias)
        self.blocks, self.merger = visual.blocks, visual.merger
        self.n_tokens = (grid // m) ** 2

        # rows in the processor's order: (grid/m, grid/m, m, m) patches, each (C, p, p) pixels
        rows = torch.arange(channels * size * size).reshape(channels, grid // m, m, p, grid // m, m, p)
        rows = rows.permute(1, 4, 2, 5, 0, 3, 6).reshape(grid * grid, channels * p * p)
        from transformers.vision_utils import get_vision_position_ids

        cos, sin = visual.rotary_pos_emb(proj.weight, get_vision_position_ids(grid_thw, m))
        order, windows = _qwen_windows(visual, grid_thw)

        def reorder(t):  # rows of merge units into window order
            return t if order is None else t.reshape(-1, m * m, t.shape[-1])[order].reshape(t.shape)

        self.register_buffer("rows", reorder(rows).reshape(-1), persistent=False)
        self.register_buffer("cos", reorder(cos), persistent=False)
        self.register_buffer("sin", reorder(sin), persistent=False)
        self.register_buffer("window_mask", windows, persistent=False)
        full = getattr(visual, "fullatt_block_indexes", range(len(self.blocks)))
        self.windowed = [windows is not None and i not in full for i in range(len(self.blocks))]
        self.register_buffer("unorder", None if order is None else torch.argsort(order), persistent=False)
        self.row_width = channels * p * p

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (1, C, S, S) -> (1, N, D)
        x = pixels.reshape(-1).index_select(0, self.rows).view(-1, self.row_width)   # (L, C*p*p)
        x = self.patch_proj(x)                                                       # (L, E)
        for blk, windowed in zip(self.blocks, self.windowed):
            mask = self.window_mask if windowed else None
            x = x + _qwen_attention(blk.attn, blk.norm1(x), self.cos, self.sin, mask)
            x = x + blk.mlp(blk.norm2(x))
        x = self.merger(x)                                                           # (N, D)
        if self.unorder is not None:
            x = x.index_select(0, self.unorder)
        return x.unsqueeze(0)


def _qwen_attention(attn, x, cos, sin, mask):
    """HF's VisionAttention for one sequence: no split by `cu_seqlens` (a data-dependent `.tolist()`)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    n = x.shape[0]
    q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (L, H, d) each
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))                        # (1, H, L, d)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
    return attn.proj(out.transpose(1, 2).reshape(n, -1))


def _qwen_windows(visual, grid_thw):
    """Qwen2.5-VL window attention for the fixed grid: the merge-unit order (None: identity) and the (L, L)
    same-window mask in that order (None: one window holds everything)."""
    if not hasattr(visual, "window_size"):
        return None, None
    from transformers.vision_utils import get_vision_window_index

    order, cu = get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size,
                                        visual.patch_size)
    window_of = torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff().long())
    mask = window_of[:, None] == window_of[None, :]
    identity = torch.equal(order, torch.arange(len(order)))
    return (None if identity else order), (None if bool(mask.all()) else mask)


@_family("qwen2vl")
def _qwen2vl(base, size):
    return QwenTower(base.visual, size), ["Conv3d patch embedding as index gather + Linear (exact)",
                                          "one image: attention over the whole sequence, no cu_seqlens split"]


@_family("qwen2_5vl")
def _qwen2_5vl(base, size):
    tower = QwenTower(base.visual, size)
    window = "window attention precomputed as a block mask" if tower.window_mask is not None else \
        "window attention is a no-op at this size (one window)"
    return tower, ["Conv3d patch embedding as index gather + Linear (exact)", window]


# SigLIP / InternViT towers -------------------------------------------------------------------------------------------
def _run_layers(layers, x, *args):
    """Call the encoder layers directly (not the tower's forward, whose output-capturing hooks break strict export);
    returns every hidden state, HF's `hidden_states` numbering: 0 = embeddings, k = after layer k."""
    states = [x]
    for layer in layers:
        x = layer(x, *args)
        states.append(x)
    return states


def _feature_layers(num_layers: int, feature_layer) -> list[int]:
    """`vision_feature_layer` (an int or a list, negative counting from the end of `hidden_states`) as indices."""
    wanted = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    return [k % (num_layers + 1) for k in wanted]


class LlavaOnevisionTower(nn.Module):
    """SigLIP → `vision_feature_layer` → projector → LLaVA-OV's packing for a single non-tiled square image.

    With one grid pinpoint equal to the image size the processor makes two identical S×S views (base + one anyres
    patch); the model packs them as base features, then the patch features row by row with `image_newline` after
    each row (`pack_image_features`: nothing to unpad for a square image, no pooling at one tile). The tower runs
    once and its features serve both views.
    """

    def __init__(self, base, size: int):
        super().__init__()
        cfg, tower = base.config, base.vision_tower
        _check_single_tile(cfg, size)
        if cfg.vision_feature_select_strategy != "full":
            raise ModelError(f"llava_onevision: vision_feature_select_strategy "
                             f"{cfg.vision_feature_select_strategy!r} on a SigLIP tower is not supported",
                             "use 'full' (SigLIP has no CLS token)")
        self.embeddings, self.projector = tower.embeddings, base.multi_modal_projector
        self.image_newline = base.image_newline
        self.feature_layers = _feature_layers(len(tower.encoder.layers), cfg.vision_feature_layer)
        self.layers = tower.encoder.layers[:max(self.feature_layers)]
        self.side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        self.n_tokens = self.side * self.side + self.side * (self.side + 1)

    def forward(self, pixels):  # (1, 3, S, S) -> (1, N, D)
        states = _run_layers(self.layers, self.embeddings(pixels), None)
        feats = torch.cat([states[k] for k in self.feature_layers], dim=-1)
        feats = self.projector(feats)[0]                                            # (side*side, D)
        grid = feats.view(self.side, self.side, -1)
        newline = self.image_newline.view(1, 1, -1).expand(self.side, 1, -1).to(feats.dtype)
        rows = torch.cat([grid, newline], dim=1).reshape(-1, feats.shape[-1])     # (side*(side+1), D)
        return torch.cat([feats, rows], dim=0).unsqueeze(0)


def _check_single_tile(cfg, size: int) -> None:
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    vision = cfg.vision_config.image_size
    views = image_size_to_num_patches((size, size), cfg.image_grid_pinpoints, vision)
    if size != vision or views != 2:
        raise ModelError(f"llava_onevision: a {size}x{size} image makes {views} views of the {vision}-px tower; "
                         "the vision_encoder export supports exactly one anyres tile",
                         f"set config.vlsi_edge.image_size to {vision} and image_grid_pinpoints to [[{vision}, "
                         f"{vision}]]")


@_family("llava_onevision")
def _llava_onevision(base, size):
    return LlavaOnevisionTower(base, size), [
        "anyres tiling off: one grid pinpoint, base view + one tile of the same image; tower run once",
        "image_newline after each tile row"]


class SmolVLMTower(nn.Module):
    """SmolVLM / Idefics3: SigLIP-like tower with a full patch mask → post-layernorm → connector (pixel shuffle +
    projection). The bucketised position ids of a full mask are precomputed."""

    def __init__(self, base, size: int):
        super().__init__()
        tower = base.vision_model
        if size != tower.config.image_size:
            raise ModelError(f"smolvlm: image_size {size} differs from the vision tower's {tower.config.image_size}",
                             "set config.vlsi_edge.image_size to the tower's size (image splitting is off)")
        emb = tower.embeddings
        self.patch_embedding, self.position_embedding = emb.patch_embedding, emb.position_embedding
        self.layers, self.post_layernorm, self.connector = tower.encoder.layers, tower.post_layernorm, base.connector
        self.register_buffer("position_ids", _smolvlm_position_ids(emb.num_patches_per_side), persistent=False)
        self.n_tokens = emb.num_patches // base.config.scale_factor ** 2

    def forward(self, pixels):
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)                # (1, P, E)
        x = x + self.position_embedding(self.position_ids)
        x = self.post_layernorm(_run_layers(self.layers, x, None)[-1])
        return self.connector(x)


def _smolvlm_position_ids(side: int) -> torch.Tensor:
    """SmolVLMVisionEmbeddings' bucketised position ids for an unpadded side×side patch grid, `(1, side*side)`."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    coords = torch.clamp(torch.arange(side, dtype=torch.float32) * (1.0 / torch.tensor(float(side))), max=1.0 - 1e-6)
    bucket = torch.bucketize(coords, boundaries, right=True)
    return (bucket[:, None] * side + bucket[None, :]).reshape(1, -1)


@_family("smolvlm")
def _smolvlm(base, size):
    return SmolVLMTower(base, size), ["image splitting off: one global image, no tiles"]


class InternVLTower(nn.Module):
    """InternViT (CLS + absolute positions) → feature layer → drop CLS → pixel shuffle → projector."""

    def __init__(self, base, size: int):
        super().__init__()
        cfg, tower = base.config, base.vision_tower
        tile, patch = _first(cfg.vision_config.image_size), _first(cfg.vision_config.patch_size)
        if size != tile:
            raise ModelError(f"internvl: image_size {size} differs from the vision tower's tile {tile}",
                             "set config.vlsi_edge.image_size to the tower's image_size (tiling is off)")
        self.embeddings, self.layernorm, self.projector = tower.embeddings, tower.layernorm, base.multi_modal_projector
        self.drop_cls = cfg.vision_feature_select_strategy == "default"
        # -1 is the tower's last_hidden_state (after its layernorm); any other layer a raw hidden state
        self.last = cfg.vision_feature_layer == -1
        self.feature_layers = _feature_layers(len(tower.encoder.layer), cfg.vision_feature_layer)
        self.layers = tower.encoder.layer[:max(self.feature_layers)]
        self.pixel_shuffle, self.ratio = base.pixel_shuffle, cfg.downsample_ratio
        self.side = size // patch
        self.n_tokens = int(self.side * self.ratio) ** 2

    def forward(self, pixels):
        emb = self.embeddings
        x = emb.patch_embeddings(pixels)                                             # (1, P, E)
        x = torch.cat([emb.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if emb.position_embeddings is not None:    # fixed size: HF's interpolation is the identity
            x = x + emb.position_embeddings
        states = _run_layers(self.layers, x)
        feats = self.layernorm(states[-1]) if self.last else torch.cat([states[k] for k in self.feature_layers], -1)
        if self.drop_cls:
            feats = feats[:, 1:]
        feats = self.pixel_shuffle(feats.reshape(1, self.side, self.side, -1), scale_factor=self.ratio)
        return self.projector(feats.reshape(1, -1, feats.shape[-1]))


def _first(v):
    return v[0] if isinstance(v, (list, tuple)) else v


@_family("internvl")
def _internvl(base, size):
    return InternVLTower(base, size), ["tiling off: one tile (max_patches=1), no thumbnail"]


class Gemma3Tower(nn.Module):
    """SigLIP → post-layernorm → Gemma3's projector (average pool to mm_tokens_per_image, RMSNorm, projection)."""

    def __init__(self, base, size: int):
        super().__init__()
        tower = base.vision_tower
        if size != tower.config.image_size:
            raise ModelError(f"gemma3: image_size {size} differs from the vision tower's {tower.config.image_size}",
                             "set config.vlsi_edge.image_size to the tower's size (pan-and-scan is off)")
        self.embeddings, self.layers = tower.embeddings, tower.encoder.layers
        self.post_layernorm, self.projector = tower.post_layernorm, base.multi_modal_projector
        self.n_tokens = base.config.mm_tokens_per_image

    def forward(self, pixels):
        x = _run_layers(self.layers, self.embeddings(pixels), None)[-1]
        return self.projector(self.post_layernorm(x))


@_family("gemma3")
def _gemma3(base, size):
    return Gemma3Tower(base, size), ["pan-and-scan off: one image"]
