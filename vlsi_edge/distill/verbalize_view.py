"""What each target layer "says": greedy decoding through every verbalizer (the VLsI paper's Figure 3).

    vlsi-edge inspect --model runs/vlsi --verbalize --image cat.png --prompt "What colour is the cat?"

For every target layer k the prompt is run through the model, layer k's hidden state at the last position goes
through its verbalizer, final norm and lm_head, the argmax token is appended, and so on for a few tokens: each layer
writes its own short continuation. Teacher and student are shown side by side when the run has both.
"""
from __future__ import annotations

from pathlib import Path

import torch

from vlsi_edge.errors import UserError


def verbalize_layers(adapter, verb, image: Path | None, prompt: str, max_tokens: int = 4) -> dict[int, str]:
    from vlsi_edge.data.collate import Collator
    from vlsi_edge.data.conversations import Sample, Turn

    sample = Sample(id="inspect", image=image, turns=(Turn("user", prompt),), meta={})
    base = Collator(adapter, mode="generate")([sample])
    vocab = len(adapter.tokenizer)
    weight = adapter.lm_head.weight[:vocab]
    out = {}
    per_token = [k for k, v in base.items()
                 if torch.is_tensor(v) and v.dim() == 2 and v.shape == base["input_ids"].shape]
    for k in verb.layers:
        batch = {key: v.clone() if torch.is_tensor(v) else v for key, v in base.items()}
        ids = []
        with torch.no_grad():
            for _ in range(max_tokens):
                h = adapter.hidden_states(batch, [k])[k][:, -1]  # (1, D)
                logits = verb.features(k, h, adapter.final_norm) @ weight.T
                token = int(logits.argmax(-1))
                ids.append(token)
                if token == adapter.tokenizer.eos_token_id:
                    break
                step = torch.tensor([[token]])
                for key in per_token:
                    fill = step if key == "input_ids" else torch.ones_like(step) if key == "attention_mask" \
                        else torch.zeros_like(step)
                    batch[key] = torch.cat([batch[key], fill], dim=1)
        out[k] = adapter.tokenizer.decode(ids, skip_special_tokens=False)
    return out


def inspect_run(run: Path, image: str | None, prompt: str, max_tokens: int = 4) -> dict:
    """Both sides of a run folder (or a student checkpoint with its verbalizers beside it)."""
    from vlsi_edge.config import DistillConfig
    from vlsi_edge.distill.verbalizer import Verbalizers
    from vlsi_edge.models import load_model

    run = Path(run)
    if not (run / "config.yaml").is_file() or not (run / "verbalizers").is_dir():
        raise UserError(f"{run} is not a run folder with verbalizers (config.yaml + verbalizers/)",
                        "train them with `vlsi-edge distill --stages verbalize ...` and pass that --out")
    img = Path(image) if image else None
    if img is not None and not img.is_file():
        raise UserError(f"image {img} not found")
    cfg = DistillConfig.from_yaml(run / "config.yaml")
    result = {}
    sides = [("student", str(run / "student") if (run / "student").is_dir() else cfg.student)]
    if cfg.teacher and (run / "verbalizers" / "teacher.safetensors").is_file():
        sides.append(("teacher", cfg.teacher))
    for role, spec in sides:
        path = run / "verbalizers" / f"{role}.safetensors"
        if not path.is_file():
            continue
        adapter = load_model(spec)
        verb = Verbalizers.load(path, expect_hidden=adapter.hidden_size)
        result[role] = {"model": spec, "layers": verbalize_layers(adapter, verb, img, prompt, max_tokens)}
    return result
