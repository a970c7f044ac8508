"""The bad-input corpus (tests/data/bad_inputs.json): every case runs one `vlsi-edge` command in-process on an input
its recipe builds, and must exit with the expected code, say what is wrong in one line (holding `expect`), print
no traceback, and leave nothing at its output path. Odd but valid inputs (CMYK, 16-bit, palette with transparency,
animated images) expect exit 0: they are converted and used."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from vlsi_edge.cli import main

CORPUS = json.loads((Path(__file__).parent / "data" / "bad_inputs.json").read_text())["cases"]


def _conversation(image: str = "img.png") -> dict:
    return {"id": "a", "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the circle? Answer with one word."},
        {"from": "gpt", "value": "red"}]}


def _data_file(tmp: Path, image_name: str = "img.png", **record) -> Path:
    path = tmp / "data.json"
    path.write_text(json.dumps([{**_conversation(image_name), **record}]))
    return path


def _image(tmp: Path, kind: str) -> Path:
    if kind == "zero_byte":
        (tmp / "img.png").write_bytes(b"")
    elif kind == "truncated_png":
        Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp / "full.png")
        data = (tmp / "full.png").read_bytes()
        (tmp / "img.png").write_bytes(data[: len(data) // 2])
    elif kind == "truncated_jpeg":
        Image.effect_noise((128, 128), 60).convert("RGB").save(tmp / "full.jpg", quality=90)
        data = (tmp / "full.jpg").read_bytes()
        (tmp / "img.jpg").write_bytes(data[: len(data) // 2])
        return _data_file(tmp, "img.jpg")
    elif kind == "text":
        (tmp / "img.png").write_text("not an image at all")
    elif kind == "cmyk":
        Image.new("CMYK", (64, 64), (0, 200, 200, 0)).save(tmp / "img.jpg")
        return _data_file(tmp, "img.jpg")
    elif kind == "16bit":
        Image.new("I;16", (64, 64), 40000).save(tmp / "img.png")
    elif kind == "palette_alpha":
        im = Image.new("P", (64, 64), 1)
        im.putpalette([255, 255, 255, 200, 20, 20] + [0] * 762)
        im.info["transparency"] = 0
        im.save(tmp / "img.png", transparency=0)
    elif kind == "animated":
        frames = [Image.new("RGB", (64, 64), c) for c in ((200, 20, 20), (20, 200, 20))]
        frames[0].save(tmp / "img.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
        return _data_file(tmp, "img.gif")
    elif kind == "huge":      # a PNG header claiming 100000 x 100000 pixels (decompression-bomb guard)
        import struct
        import zlib

        def chunk(tag: bytes, body: bytes) -> bytes:
            return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

        ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
        (tmp / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return _data_file(tmp)


def _bundle(tmp: Path, kind: str) -> Path:
    """A small valid-looking bundle folder written by the real manifest writer, then damaged."""
    from vlsi_edge.runtimes.bundle import read_manifest, write_manifest

    root = tmp / "bundle"
    root.mkdir()
    for name in ("vision_encoder.onnx", "token_embedding.onnx", "text_decoder.onnx", "tokenizer.json",
                 "generation.json", "preprocess.json"):
        (root / name).write_text("{}")
    parts = {n: {"file": f"{n}.onnx", "precision": "fp32", "inputs": [], "outputs": []}
             for n in ("vision_encoder", "token_embedding", "text_decoder")}
    write_manifest(root, {"target": "onnx", "parts": parts, "model": {"family": "qwen2vl"}, "tools": {}})
    if kind == "no_manifest":
        (root / "manifest.json").unlink()
    elif kind == "missing_part":
        (root / "text_decoder.onnx").unlink()
    elif kind == "modified":
        (root / "tokenizer.json").write_text('{"changed": true}')
    elif kind in ("escape", "future"):
        manifest = read_manifest(root) if kind == "escape" else json.loads((root / "manifest.json").read_text())
        if kind == "escape":
            manifest["parts"]["text_decoder"]["file"] = "../outside.onnx"
            (root / "manifest.json").write_text(json.dumps(manifest))
        else:
            manifest["format_version"] = 99
            (root / "manifest.json").write_text(json.dumps(manifest))
    elif kind == "bad_manifest":
        (root / "manifest.json").write_text("{ not json")
    return root


def _results(tmp: Path, kind: str) -> Path:
    from vlsi_edge.results import make_results

    path = tmp / "r.json"
    if kind == "garbage":
        path.write_text("[1, 2")
        return path
    doc = make_results("eval", {"name": "x"}, {"spec": "d", "split": "test"}, [], {})
    if kind == "other_schema":
        doc["schema"] = "someone-else/results"
    else:
        doc["schema_version"] = 0
    path.write_text(json.dumps(doc))
    return path


def build(recipe: str, tmp: Path) -> Path | None:
    group, _, kind = recipe.partition(":")
    if group == "none":
        return None
    if group == "data":
        path = tmp / "data.json"
        if kind == "empty":
            path.write_text("")
        elif kind == "garbage":
            path.write_text("{this is not json")
        elif kind == "jsonl_bad_line":
            path = tmp / "data.jsonl"
            Image.new("RGB", (32, 32)).save(tmp / "img.png")
            path.write_text(json.dumps(_conversation()) + "\n{broken\n")
        elif kind == "no_conversations":
            Image.new("RGB", (32, 32)).save(tmp / "img.png")
            path.write_text(json.dumps([{"id": "a", "image": "img.png"}]))
        elif kind == "image_escape":
            path = _data_file(tmp, "../../etc/passwd")
        elif kind == "image_missing":
            path = _data_file(tmp, "ghost.png")
        return path
    if group == "image":
        return _image(tmp, kind)
    if group == "config":
        path = tmp / "cfg.yaml"
        path.write_text({"unknown_key": "nonsense: 1\n", "wrong_type": "train:\n  batch_size: many\n",
                         "negative": "optim:\n  lr: -0.1\n", "garbage": "train: [unclosed\n"}[kind])
        return path
    if group == "model":
        folder = tmp / "model"
        if kind == "file":
            folder.write_text("weights?")
            return folder
        folder.mkdir()
        if kind == "bad_config":
            (folder / "config.json").write_text("{oops")
        elif kind == "wrong_family":
            (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
        elif kind == "missing_weights":
            from vlsi_edge.models import load_model

            load_model("builtin:tiny-qwen2vl-student").save_pretrained(folder)
            for p in folder.glob("*.safetensors"):
                p.unlink()
        return folder
    if group == "out":
        folder = tmp / "outdir"
        folder.mkdir()
        if kind == "readonly":
            folder.chmod(0o500)
        else:
            (folder / "something.txt").write_text("keep me")
        return folder
    if group == "bundle":
        return _bundle(tmp, kind)
    if group == "results":
        return _results(tmp, kind)
    raise ValueError(recipe)


@pytest.mark.parametrize("case", CORPUS, ids=[c["id"] for c in CORPUS])
def test_bad_input(case, tmp_path, capsys):
    if case["recipe"] == "out:readonly" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders: the not-writable case needs an unprivileged user")
    file = build(case["recipe"], tmp_path)
    out = tmp_path / "out"
    fill = {"{tmp}": str(tmp_path), "{out}": str(out), "{file}": str(file)}

    def sub(s: str) -> str:
        for k, v in fill.items():
            s = s.replace(k, v)
        return s

    argv = [sub(a) for a in case["argv"]]
    try:
        code = main(argv)
    except SystemExit as exc:        # argparse errors
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == case.get("exit", 2), err
    assert "Traceback" not in err
    if code == 0:                     # odd but valid input: converted and used, the result written
        assert out.exists()
        return
    assert len(err.splitlines()) == 1, err
    assert case["expect"] in err, err
    watched = case.get("out", "{out}")
    if watched is not None:
        assert not Path(sub(watched)).exists(), f"{sub(watched)} was left behind"
    if case["recipe"] == "out:exists":
        assert (file / "something.txt").read_text() == "keep me"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and "tmp" in p.name]
    assert not leftovers, leftovers
    if file is not None and file.is_dir():
        shutil.rmtree(file, ignore_errors=True)


def _blank_png(path: Path, width: int, height: int) -> None:
    """A real, fully decodable white RGB PNG of any size, written row by row (a 20000 x 20000 one is ~1 MB)."""
    import struct
    import zlib

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    packer, row, parts = zlib.compressobj(9), b"\x00" + b"\xff" * (3 * width), []
    for _ in range(height):
        parts.append(packer.compress(row))
    parts.append(packer.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("side, code", [(20_000, 2), (6_000, 0)])
def test_huge_images_are_refused_or_resized_within_bounded_memory(side, code, tmp_path):
    """A 20000 x 20000 image (400 M pixels) is refused from its header; a 6000 x 6000 one (36 M pixels, under the
    limit) is decoded and resized. Either way the process's peak RSS stays under 1.5 GB (measured)."""
    import subprocess
    import sys

    _blank_png(tmp_path / "img.png", side, side)
    data = _data_file(tmp_path)
    script = (
        "import resource, sys\n"
        "from vlsi_edge.cli import main\n"
        f"code = main(['eval', '--model', 'builtin:tiny-qwen2vl-student', '--data', {str(data)!r}, "
        f"'--out', {str(tmp_path / 'r.json')!r}])\n"
        "print('PEAK_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
        "sys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == code, proc.stderr[-1500:]
    peak = float(proc.stdout.split("PEAK_MB")[-1])
    assert peak < 1536, f"peak RSS {peak:.0f} MB"
    if code == 2:
        assert "40,000,000 pixels" in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "r.json").exists()
    else:
        assert json.loads((tmp_path / "r.json").read_text())["data"]["n"] == 1
