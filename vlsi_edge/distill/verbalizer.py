"""Verbalizers: a per-layer verb-FFN read through the model's own frozen final norm and lm_head.

VLsI (https://arxiv.org/abs/2412.01822, §3.1): `v = W_down(silu(W_gate h) * W_up h)`, three d×d matrices; METHOD.md's
default adds a residual, `logits = lm_head(norm(h + v))`, with W_down zero-initialised so a fresh verbalizer is the
logit lens; `residual: false` is the paper-literal `lm_head(norm(v))`. Verbalizers exist for training and for
`vlsi-edge inspect --verbalize`; the exported student has none.

    verb = Verbalizers(layers=[1, 2, 3, 4], hidden_size=128)
    x = verb.features(2, h, final_norm)          # (N, D), then losses.chunked_ce(x, lm_head.weight, y, vocab)
    verb.save("RUN/verbalizers/student.safetensors", model_hash=fingerprint(model))
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlsi_edge.errors import UserError


class VerbFFN(nn.Module):
    def __init__(self, hidden_size: int, residual: bool = True):
        super().__init__()
        self.residual = residual
        self.gate = nn.Linear(hidden_size, hidden_size, bias=False)
        self.up = nn.Linear(hidden_size, hidden_size, bias=False)
        self.down = nn.Linear(hidden_size, hidden_size, bias=False)
        if residual:
            nn.init.zeros_(self.down.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        v = self.down(F.silu(self.gate(h)) * self.up(h))
        return h + v if self.residual else v


class Verbalizers(nn.Module):
    """One VerbFFN per target layer; the final norm and lm_head are the model's (passed in, never owned)."""

    def __init__(self, layers: list[int], hidden_size: int, residual: bool = True):
        super().__init__()
        self.layers = list(layers)
        self.hidden_size = hidden_size
        self.residual = residual
        self.ffn = nn.ModuleDict({str(k): VerbFFN(hidden_size, residual) for k in self.layers})

    def features(self, layer: int, h: torch.Tensor, final_norm: nn.Module) -> torch.Tensor:
        """norm(verbFFN(h)) for layer `layer`: (N, D) -> (N, D), ready for the lm_head projection."""
        ffn = self.ffn[str(layer)]
        dtype = ffn.gate.weight.dtype
        return final_norm(ffn(h.to(dtype)).to(h.dtype))

    # persistence ----------------------------------------------------------------------------------------
    def save(self, path: str | Path, model_hash: str, role: str, state: dict | None = None) -> None:
        """Write the verb-FFNs (or `state`, e.g. gathered from FSDP2 shards) with their identity as metadata."""
        from safetensors.torch import save_file

        from vlsi_edge.fileio import atomic_path

        meta = {"format": "vlsi-edge/verbalizers", "version": "1", "layers": json.dumps(self.layers),
                "hidden_size": str(self.hidden_size), "residual": str(self.residual).lower(),
                "model_hash": model_hash, "role": role}
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in (state or self.state_dict()).items()}
        with atomic_path(Path(path)) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, expect_layers: list[int] | None = None, expect_hash: str | None = None,
             expect_hidden: int | None = None) -> "Verbalizers":
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise UserError(f"verbalizers {path} not found", "pass RUN/verbalizers/teacher.safetensors from a run")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # not a safetensors file
            raise UserError(f"{path} is not a verbalizer safetensors file ({type(e).__name__})") from None
        if meta.get("format") != "vlsi-edge/verbalizers":
            raise UserError(f"{path} is not a vlsi-edge verbalizer file")
        layers, hidden = json.loads(meta["layers"]), int(meta["hidden_size"])
        if expect_layers is not None and layers != list(expect_layers):
            raise UserError(f"{path} holds verbalizers for layers {layers}; the model uses target layers "
                            f"{list(expect_layers)}", "retrain them with --stages verbalize, or match the layers")
        if expect_hidden is not None and hidden != expect_hidden:
            raise UserError(f"{path} was trained for hidden size {hidden}, the model has {expect_hidden}")
        if expect_hash is not None and meta.get("model_hash") != expect_hash:
            raise UserError(f"{path} was trained on a different model (hash {meta.get('model_hash', '?')[:12]} vs "
                            f"{expect_hash[:12]})", "retrain the verbalizers for this teacher")
        verb = cls(layers, hidden, residual=meta.get("residual") == "true")
        verb.load_state_dict(load_file(str(path)))
        return verb


def fingerprint(model: nn.Module | dict) -> str:
    """A content hash of a model's weights (a module or a state dict): names, shapes, dtypes and a strided sample
    of every tensor. Cheap on a 72B checkpoint (a few thousand values per tensor), yet any retraining changes it.
    """
    h = hashlib.sha256()
    state = model if isinstance(model, dict) else model.state_dict()
    for name, t in sorted(state.items()):
        flat = t.detach().reshape(-1)
        stride = max(1, flat.numel() // 4096)
        sample = flat[::stride].to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()
