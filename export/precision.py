"""Precision names per target and part (DESIGN.md's table), and parsing of `--precision`.

`--precision` takes one name, applied to every part whose row allows it (the others stay fp32), or a per-part list
`vision=…,embedding=…,decoder=…`. A per-part name the row does not allow is refused with that row.
"""
from __future__ import annotations

from vlsi_edge.errors import UserError

TABLE = {
    "onnx": {"vision_encoder": ("fp32", "int8"), "token_embedding": ("fp32",),
             "text_decoder": ("fp32", "int8", "int4")},
    "jetson": {"vision_encoder": ("fp32", "fp16"), "token_embedding": ("fp32", "fp16"),
               "text_decoder": ("fp32", "fp16", "int8")},
    "phone": {"vision_encoder": ("fp32", "8da8w"), "token_embedding": ("fp32", "int8"),
              "text_decoder": ("fp32", "8da8w", "8da4w")},
}
SHORT = {"vision": "vision_encoder", "embedding": "token_embedding", "decoder": "text_decoder"}


def row(target: str) -> str:
    return "; ".join(f"{part}: {'|'.join(names)}" for part, names in TABLE[target].items())


def parse(spec: str | None, target: str) -> dict[str, str]:
    """`spec` → {part: precision} for `target`."""
    if target not in TABLE:
        raise UserError(f"unknown target {target!r}", f"expected one of {', '.join(TABLE)}")
    table = TABLE[target]
    out = {part: "fp32" for part in table}
    spec = (spec or "fp32").strip()
    if "=" not in spec:
        if not any(spec in names for names in table.values()):
            every = sorted({n for names in table.values() for n in names})
            raise UserError(f"precision {spec!r} is not available for --target {target}",
                            f"expected one of {', '.join(every)} ({row(target)})")
        return {part: spec if spec in names else "fp32" for part, names in table.items()}
    for item in spec.split(","):
        key, _, name = item.partition("=")
        part = SHORT.get(key.strip(), key.strip())
        if part not in table:
            raise UserError(f"unknown part {key.strip()!r} in --precision {spec!r}",
                            "expected vision=…,embedding=…,decoder=…")
        if name.strip() not in table[part]:
            raise UserError(f"{part} cannot be {name.strip()!r} for --target {target}",
                            f"expected {'|'.join(table[part])} ({row(target)})")
        out[part] = name.strip()
    return out
