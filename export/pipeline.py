"""`vlsi-edge export`: a student checkpoint → a verified, parity-gated bundle.

    export_model("runs/tiny/student", target="onnx", precision="decoder=int8", out="bundles/tiny-onnx")

Order of work: every argument is checked before the model loads; the bundle is built in a temporary folder beside
`out`; the manifest lists the sha256 of every file; the parity gate runs on the finished bundle through the same
runtime a device uses; then the folder is renamed to `out`, or to `<out>.rejected/` (with parity.json) when the gate
fails — nothing that failed ever sits at `out`.
"""
from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from vlsi_edge.export import precision as PREC

from vlsi_edge.errors import UserError
from vlsi_edge.fileio import disk_full, publish_dir, staging_dir

PARITY_MODES = ("on", "off")
CALIBRATION_ITEMS = 32


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("vlsi-edge", "torch", "transformers", "onnx", "onnxruntime", "onnxslim", "executorch", "torchao"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"output {out} already exists", "pass --overwrite to replace it, or choose another --out")
    parent = out.parent if out.parent != Path("") else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write into {parent}", "expected a writable folder for --out")


def _probes(vlm, data: str, n: int, splits=("val", "test")):
    """n samples from `data` (val split, falling back to test) with distinct images, plus their device pixels."""
    from vlsi_edge.runtimes.preprocess import load_image

    from vlsi_edge.data.conversations import open_dataset

    out, seen = [], set()
    for split in splits:
        try:
            dataset = open_dataset(data, split=split)
        except UserError:
            continue
        for sample in dataset:
            if sample.image is None or str(sample.image) in seen:
                continue
            seen.add(str(sample.image))
            out.append((sample, load_image(sample.image, vlm.image_size)))
            if len(out) == n:
                return out
    if len(out) < 2:
        raise UserError(f"--data {data} gave {len(out)} usable probe images", "expected at least 2 items with images")
    return out


def _write_side_files(vlm, tmp: Path) -> None:
    """tokenizer.json, preprocess.json, generation.json: what a device needs besides the parts."""
    from vlsi_edge.export import parts as PARTS

    vlm.tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
    preprocess = {"image_size": vlm.image_size, "resize": "bicubic", "layout": "NCHW", "dtype": "uint8",
                  "channels": "RGB", "normalisation": "inside vision_encoder"}
    for name, obj in (("preprocess.json", preprocess), ("generation.json", PARTS.generation_config(vlm))):
        (tmp / name).write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _write_onnx(parts, facts: dict, tmp: Path, target: str, precisions: dict, calibration,
                build_engines: bool) -> dict:
    from vlsi_edge.export import onnx_export as OX
    from vlsi_edge.export import parts as PARTS

    lint_shapes = {"vision_encoder": {}, "token_embedding": {"input_ids": (1, 5)},
                   "text_decoder": PARTS.decoder_shapes(facts, 5, 3)}
    facts_parts = {}
    for name, part in parts.items():
        path = tmp / f"{name}.onnx"
        OX.export_part(part, path)
        prec = precisions[name]
        if prec == "int8" and target == "onnx":
            OX.quantize_int8_dynamic(path)
        elif prec == "int4":
            OX.quantize_int4(path)
        elif prec == "fp16":
            OX.convert_fp16(path)
        elif prec == "int8" and target == "jetson":
            OX.quantize_int8_qdq(path, _calibration(parts, facts, tmp, calibration))
        report = OX.lint(path, lint_shapes[name])
        if report:
            raise UserError(f"{name}.onnx fails `polygraphy check lint`: {report.splitlines()[-1]}",
                            "this is an exporter bug; please report it with the model's config")
        files = [f for f in (path.name, path.name + ".data") if (tmp / f).exists()]
        facts_parts[name] = {"file": path.name, "files": files, "precision": prec, "lint": "clean",
                             "inputs": part.input_names, "outputs": part.output_names}
    manifest = {"parts": facts_parts}
    if target == "jetson":
        from vlsi_edge.export import tensorrt_build as TRT

        manifest.update(TRT.jetson_extras(facts, tmp, precisions, build_engines))
    else:
        manifest["runtime"] = {"ort": {"providers": ["CPUExecutionProvider"]}}
    return manifest


def _calibration(parts, facts: dict, tmp: Path, probes) -> list[dict]:
    """Decoder prefill feeds for Q/DQ calibration: the probe items prompted as a device prompts them (the bundle's
    tokenizer and template, written first), embedded by the PyTorch parts."""
    import numpy as np
    import torch

    from vlsi_edge.export import parts as PARTS
    from vlsi_edge.runtimes.generate import merge_prompt
    from vlsi_edge.runtimes.text import Prompter

    prompter = Prompter(tmp / "tokenizer.json", json.loads((tmp / "generation.json").read_text()))
    feeds = []
    for sample, pixels in probes:
        ids = prompter.ids(sample.turns[0].text)
        with torch.no_grad():
            tokens = parts["token_embedding"].module(torch.from_numpy(ids)[None]).numpy()
            image = parts["vision_encoder"].module(torch.from_numpy(pixels[None])).numpy()
        embeds, pos, _, is_image = merge_prompt(facts, ids, tokens, image)
        feed = {"inputs_embeds": embeds, "attention_mask": np.ones((1, len(ids)), np.int64), "position_ids": pos}
        if facts["image_mask"] == "bidirectional":
            feed["token_type_ids"] = is_image.astype(np.int64)[None]
        for name, shape in PARTS.decoder_shapes(facts, len(ids), 0).items():
            if name.startswith("past_key_values"):
                feed[name] = np.zeros(shape, np.float32)
        feeds.append(feed)
    return feeds


def _gate(vlm, parts, tmp: Path, target: str, precisions: dict, probes) -> list[str]:
    from vlsi_edge.export import parity as PAR
    from vlsi_edge.runtimes.base import open_runtime

    backend = "executorch" if target == "phone" else "ort"
    runtime = open_runtime(backend, bundle=tmp)
    report = PAR.check(vlm, parts, runtime, probes)
    failures = PAR.verdict(report, precisions)
    report.update({"backend": backend, "precisions": precisions, "passed": not failures, "failures": failures,
                   "gates": {part: PAR.GATES[name] for part, name in precisions.items()}})
    (tmp / "parity.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return failures


def export_model(model: str, target: str, out, precision: str | None = None, data: str = "builtin:shapes",
                 overwrite: bool = False, parity: str = "on", probes: int = 6, build_engines: bool = False,
                 max_seq_len: int = 512, image_size: int | None = None) -> Path:
    precisions = PREC.parse(precision, target)
    if parity not in PARITY_MODES:
        raise UserError(f"--parity {parity!r} is not known", "expected on or off")
    out = Path(out)
    _check_out(out, overwrite)

    from vlsi_edge.distill.verbalizer import fingerprint
    from vlsi_edge.export import parts as PARTS
    from vlsi_edge.models import load_model

    vlm = load_model(model)
    if image_size is not None:
        PARTS.set_image_size(vlm, image_size)
    parts = PARTS.split_model(vlm)
    facts = PARTS.model_facts(vlm, parts["vision_encoder"].meta["n_image_tokens"])
    tmp = staging_dir(out)
    try:
        manifest = {"target": target, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "source": {"model": str(model), "family": vlm.family,
                               "weights_fingerprint": fingerprint(vlm.model)}, "model": facts, "tools": _versions(),
                    "parity": {"mode": parity}}
        probe_items = _probes(vlm, data, probes) if parity == "on" else []
        _write_side_files(vlm, tmp)
        if target == "phone":
            from vlsi_edge.export import executorch_export as ET

            manifest.update(ET.write_program(vlm, tmp, precisions, max_seq_len))
        else:
            calibration = _probes(vlm, data, CALIBRATION_ITEMS, ("train", "val")) if "int8" in precisions.values() \
                and target == "jetson" else []
            manifest.update(_write_onnx(parts, facts, tmp, target, precisions, calibration, build_engines))
        from vlsi_edge.runtimes.bundle import write_manifest

        write_manifest(tmp, manifest)
        failures = []
        if parity == "on":
            failures = _gate(vlm, parts, tmp, target, precisions, probe_items)
            write_manifest(tmp, manifest)
        if failures:
            rejected = out.parent / f"{out.name}.rejected"
            publish_dir(tmp, rejected, True, None)
            more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
            raise UserError(f"parity gate failed: {failures[0]}{more}",
                            f"the bundle went to {rejected} with its parity.json")
        publish_dir(tmp, out, overwrite, lambda: UserError(f"output {out} appeared while exporting",
                                                            "pass --overwrite or choose another --out"))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a full disk surfaces as whatever the writing library raises
        weights = sum(t.numel() * t.element_size() for t in vlm.model.state_dict().values())
        if not disk_full(tmp.parent, exc, margin=weights):
            raise
        free = shutil.disk_usage(tmp.parent).free
        raise UserError(f"no space left on device while writing the bundle for {out} ({free / 1e6:.1f} MB free, "
                        f"the model's weights alone are {weights / 1e6:.1f} MB); nothing was written there",
                        "free space (or choose another --out), then rerun") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
