"""Copy the checkpoints made by scripts/pretrain_tiny.sh into the package, with checksums and their test accuracies.

    python scripts/ship_pretrained.py pretrain-out   # reads pretrain-out/<run>/student + <run>-test.json per model

Ships every model of MODELS whose run folder exists under OUT_DIR; the others keep their shipped copy and entry.

Writes vlsi_edge/assets/pretrained/<name>/ (weights and tokenizer files, as the run saved them) and
vlsi_edge/assets/pretrained/manifest.json, which `load_model("builtin:<name>")` checks at every load.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "vlsi_edge" / "assets" / "pretrained"
FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "processor_config.json", "chat_template.jinja")
LIMIT_MB = 40


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# shipped name -> (run folder under OUT_DIR, preset role)
MODELS = {
    "tiny-qwen2vl-student-pretrained": ("student", "student"),
    "tiny-qwen2vl-teacher-pretrained": ("teacher", "teacher"),
    "tiny-qwen2vl-student-early-pretrained": ("student-early", "student"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the OUT_DIR of scripts/pretrain_tiny.sh")
    args = ap.parse_args()
    recipe = (Path(__file__).parent / "pretrain_tiny.sh").read_text()
    manifest_path = ROOT / "manifest.json"
    models = json.loads(manifest_path.read_text())["models"] if manifest_path.exists() else {}
    shipped = []
    for name, (run, role) in MODELS.items():
        src = args.out / run / "student"
        if not src.is_dir():  # not remade this time: the shipped copy and its manifest entry stay
            continue
        doc = json.loads((args.out / f"{run}-test.json").read_text())
        dst = ROOT / name
        if dst.exists():
            shutil.rmtree(dst)
        dst.mkdir(parents=True)
        for f in FILES:
            shutil.copyfile(src / f, dst / f)
        metrics = doc["metrics"]
        models[name] = {
            "folder": name, "from_preset": f"builtin:tiny-qwen2vl-{role}",
            "files": {f: sha256(dst / f) for f in FILES},
            "size_mb": round(sum((dst / f).stat().st_size for f in FILES) / 2**20, 2),
            "test_data": doc["data"]["spec"], "test_items": doc["data"]["n"],
            "test_accuracy": metrics["overall"]["acc"],
            "test_ci95": [metrics["overall"]["lo"], metrics["overall"]["hi"]],
            "per_category": {c: {k: m[k] for k in ("acc", "lo", "hi", "n")} for c, m in metrics["per_category"].items()},
            "recipe": "scripts/pretrain_tiny.sh", "recipe_sha256": hashlib.sha256(recipe.encode()).hexdigest(),
        }
        shipped.append(name)
    total = sum(m["size_mb"] for m in models.values())
    if total > LIMIT_MB:
        raise SystemExit(f"shipped checkpoints are {total:.1f} MB together; the package allows {LIMIT_MB} MB")
    manifest_path.write_text(json.dumps({"models": dict(sorted(models.items()))}, indent=1) + "\n")
    print(f"shipped {', '.join(shipped) or 'nothing'} ({total:.1f} MB in the package) into {ROOT}")


if __name__ == "__main__":
    main()
