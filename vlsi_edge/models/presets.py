"""Built-in tiny presets: `builtin:tiny-<family>-teacher` and `builtin:tiny-<family>-student` for every family.

Real transformers config classes at small sizes, random init from a fixed seed, the offline tokenizer of
`tokenizer.py`. Teacher and student of a family share the tokenizer and image processor; the teacher is deeper
and wider and pads its vocabulary differently (METHOD.md: compare distributions over the common prefix).
`tiny-qwen2vl-student-lowres` sees 84-pixel images (9 image tokens instead of 16) for the alignment path.

    vlsi-edge inspect --list
    vlsi-edge inspect --model builtin:tiny-qwen2vl-teacher
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from vlsi_edge.errors import ModelError

FAMILY_NAMES = ("qwen2vl", "qwen2_5vl", "llava_onevision", "smolvlm", "internvl", "gemma3")


@dataclass(frozen=True)
class TinySpec:
    """Sizes of one tiny preset; each adapter maps them onto its family's config classes."""

    name: str
    family: str
    role: str                   # teacher | student
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vision_depth: int
    vision_hidden: int
    vision_heads: int
    target_layers: tuple[int, ...]
    image_size: int = 112       # the processor resizes every image to this square
    vocab_multiple: int = 64    # lm_head rows = tokenizer length rounded up to this
    seed: int = 0


_STUDENT = dict(role="student", num_layers=5, hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256,
                vision_depth=2, vision_hidden=64, vision_heads=2, target_layers=(1, 2, 3, 4), vocab_multiple=64,
                seed=1)
_TEACHER = dict(role="teacher", num_layers=10, hidden_size=256, num_heads=8, num_kv_heads=4, intermediate_size=512,
                vision_depth=3, vision_hidden=96, vision_heads=4, target_layers=tuple(range(1, 10)),
                vocab_multiple=128, seed=2)


def _all_presets() -> dict[str, TinySpec]:
    out = {}
    for family in FAMILY_NAMES:
        for sizes in (_TEACHER, _STUDENT):
            name = f"tiny-{family}-{sizes['role']}"
            out[name] = TinySpec(name=name, family=family, **sizes)
    lowres = out["tiny-qwen2vl-student"]
    out["tiny-qwen2vl-student-lowres"] = replace(lowres, name="tiny-qwen2vl-student-lowres", image_size=84)
    return out


PRESETS: dict[str, TinySpec] = _all_presets()


def get_preset(name: str) -> TinySpec:
    if name not in PRESETS:
        raise ModelError(f"unknown preset builtin:{name}; built-in presets: "
                         + ", ".join(f"builtin:{n}" for n in PRESETS),
                         "run `vlsi-edge inspect --list`")
    return PRESETS[name]


def build_preset(name: str, dtype: str = "float32", device: str = "cpu"):
    """Build a preset's model (random init, fixed seed), processor and tokenizer; returns the family adapter."""
    from vlsi_edge.models.registry import adapter_for_family
    from vlsi_edge.models.tokenizer import hf_tokenizer

    spec = get_preset(name)
    adapter = adapter_for_family(spec.family).tiny(spec, hf_tokenizer(spec.family))
    return adapter.to(dtype=dtype, device=device)


def padded_vocab(tokenizer, multiple: int) -> int:
    n = len(tokenizer)
    return (n + multiple - 1) // multiple * multiple
