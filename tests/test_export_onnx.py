"""ONNX export end to end on a briefly trained tiny student: the bundle reproduces transformers `generate` tokens
and per-step logits at fp32 through ONNX Runtime and the shared generation loop; int8 passes its own gate; a
perturbed export fails the default gate; `verify` catches damaged bundles; ONNX Runtime generation runs with torch
and transformers unimportable; bad CLI input gets one line and exit 2."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from vlsi_edge.cli import main

pytest.importorskip("onnxruntime")


DATA = "builtin:shapes:n_pretrain=0,n_train=64,n_val=16,n_test=16"


@pytest.fixture(scope="module")
def student(tmp_path_factory, train_briefly):
    return train_briefly("qwen2vl", tmp_path_factory.mktemp("qwen2vl") / "student")


@pytest.fixture(scope="module")
def fp32_bundle(student, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "fp32"
    assert main(["export", "--model", str(student), "--target", "onnx", "--data", DATA, "--out", str(out)]) == 0
    return out


def test_bundle_files_follow_the_umask(fp32_bundle):
    """onnx writes external data 0600 and mkstemp does too; a bundle copied to a device is often run by another
    user, so every file is readable as the umask allows."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in fp32_bundle.rglob("*") if p.is_file()}
    assert any(name.endswith(".onnx.data") for name in modes)
    assert all(mode == 0o666 & ~umask for mode in modes.values()), modes


def test_fp32_bundle_matches_transformers_generate(student, fp32_bundle):
    import torch
    from vlsi_edge.runtimes.base import open_runtime
    from vlsi_edge.runtimes.generate import generate

    from vlsi_edge.data.collate import Collator
    from vlsi_edge.data.conversations import open_dataset
    from vlsi_edge.models import load_model

    report = json.loads((fp32_bundle / "parity.json").read_text())
    assert report["passed"], report["failures"]
    assert report["text_decoder"]["teacher_forced"]["counted"] >= 32
    assert report["distinct_images"] == {"reference": True, "bundle": True, "first_step_logits": True}

    vlm = load_model(str(student))
    runtime = open_runtime("ort", bundle=fp32_bundle)
    samples = list(open_dataset(DATA, split="test"))[:4]
    for sample in samples:
        batch = Collator(vlm, mode="generate")([sample])
        with torch.no_grad():
            ref = vlm.model.generate(**batch, max_new_tokens=6, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
        want = ref.sequences[0, batch["input_ids"].shape[1]:].tolist()
        got = generate(runtime, sample.image, sample.turns[0].text, max_new_tokens=6, keep_logits=True)
        assert got.tokens == want
        for step, logits in enumerate(got.step_logits):
            np.testing.assert_allclose(logits, ref.logits[step][0].numpy(), atol=1e-4, rtol=0)
        assert set(got.timings) >= {"preprocess_ms", "vision_ms", "prefill_ms", "decode_ms"}


def test_int8_decoder_passes_its_gate(student, tmp_path):
    out = tmp_path / "int8"
    assert main(["export", "--model", str(student), "--target", "onnx", "--precision", "decoder=int8",
                 "--data", DATA, "--out", str(out)]) == 0
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and report["precisions"]["text_decoder"] == "int8"
    assert report["text_decoder"]["teacher_forced"]["top1"] >= 0.97


@pytest.mark.matrix
def test_int4_decoder_passes_its_gate(student, tmp_path):
    import onnx

    out = tmp_path / "int4"
    assert main(["export", "--model", str(student), "--target", "onnx", "--precision", "decoder=int4",
                 "--data", DATA, "--out", str(out)]) == 0
    assert "MatMulNBits" in {n.op_type for n in onnx.load(str(out / "text_decoder.onnx")).graph.node}
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and report["text_decoder"]["teacher_forced"]["top1"] >= 0.95


def test_jetson_fp16_and_int8_pass_their_gates_and_leave_trtexec_commands(student, tmp_path, capsys):
    """Without TensorRT here, --build-engines says so and writes build_engines.sh; the manifest carries the
    optimisation profiles and the ORT provider chain (TensorRT EP → CUDA → CPU)."""
    fp16 = tmp_path / "fp16"
    assert main(["export", "--model", str(student), "--target", "jetson", "--precision", "fp16", "--data", DATA,
                 "--out", str(fp16), "--build-engines"]) == 0
    assert "wrote build_engines.sh" in capsys.readouterr().out
    manifest = json.loads((fp16 / "manifest.json").read_text())
    assert [p if isinstance(p, str) else p[0] for p in manifest["runtime"]["ort"]["providers"]] == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert "not_built" in manifest["tensorrt"]
    lo, opt, hi = manifest["tensorrt"]["profiles"]["text_decoder"]["inputs_embeds"]
    assert lo[1] <= opt[1] <= hi[1]
    script = (fp16 / "build_engines.sh").read_text()
    assert script.count("trtexec --onnx=") == 3 and "--stronglyTyped" in script
    import onnx

    decoder = onnx.load(str(fp16 / "text_decoder.onnx"))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in decoder.graph.initializer)
    int8 = tmp_path / "int8"
    assert main(["export", "--model", str(student), "--target", "jetson", "--precision", "decoder=int8",
                 "--data", DATA, "--out", str(int8)]) == 0
    graph = onnx.load(str(int8 / "text_decoder.onnx")).graph
    int8_weights = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    dequantized = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8_weights]
    layers = json.loads((int8 / "manifest.json").read_text())["model"]["num_layers"]
    assert len(dequantized) == 6 * layers      # q, k, v, o, gate, up of every layer; not down_proj, not lm_head
    for bundle in (fp16, int8):
        assert json.loads((bundle / "parity.json").read_text())["passed"]


@pytest.mark.skipif(not __import__("importlib").util.find_spec("tensorrt"), reason="TensorRT is not installed "
                    "(not installable from PyPI here); engines are built on a Jetson or a CUDA machine")
def test_tensorrt_engines_build(student, tmp_path):
    from vlsi_edge.export.tensorrt_build import tensorrt_available

    if tensorrt_available():
        pytest.skip(tensorrt_available())
    out = tmp_path / "trt"
    assert main(["export", "--model", str(student), "--target", "jetson", "--precision", "fp16", "--data", DATA,
                 "--out", str(out), "--build-engines"]) == 0
    assert (out / "cache" / "text_decoder.engine").stat().st_size > 0
    from vlsi_edge.runtimes.base import open_runtime
    from vlsi_edge.runtimes.generate import generate

    from vlsi_edge.data.conversations import open_dataset

    sample = next(iter(open_dataset(DATA, split="test")))
    want = generate(open_runtime("ort", bundle=out, providers=["CPUExecutionProvider"]), sample.image,
                    sample.turns[0].text, max_new_tokens=6).tokens
    assert generate(open_runtime("tensorrt", bundle=out), sample.image, sample.turns[0].text,
                    max_new_tokens=6).tokens == want


def test_perturbed_export_fails_the_default_gate(student, fp32_bundle, tmp_path):
    """Scale the exported lm_head by (1 + eps) so the largest logit moves by ~3e-3, three times the fp32 gate's
    max abs diff, while top-1 stays the same: the gate must fail, naming the part and the metric."""
    import onnx
    import torch
    from onnx import numpy_helper
    from vlsi_edge.export import parity as PAR
    from vlsi_edge.export.onnx_export import save_onnx
    from vlsi_edge.export.parts import split_model
    from vlsi_edge.export.pipeline import _probes
    from vlsi_edge.runtimes.base import open_runtime
    from vlsi_edge.runtimes.bundle import read_manifest, write_manifest

    from vlsi_edge.data.collate import Collator
    from vlsi_edge.models import load_model

    vlm = load_model(str(student))
    probes = _probes(vlm, DATA, 4)
    with torch.no_grad():
        peak = max(float(vlm.model(**Collator(vlm, mode="generate")([s])).logits.abs().max()) for s, _ in probes)
    bad = tmp_path / "bad"
    shutil.copytree(fp32_bundle, bad)
    path = bad / "text_decoder.onnx"
    model = onnx.load(str(path))
    head = vlm.lm_head.weight.detach().numpy()
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.shape in (head.shape, head.T.shape) and np.array_equal(w if w.shape == head.shape else w.T, head):
            init.CopyFrom(numpy_helper.from_array(w * np.float32(1 + 3e-3 / peak), init.name))
            break
    else:
        pytest.fail("lm_head initializer not found")
    save_onnx(model, path)
    manifest = read_manifest(bad)
    manifest.pop("files")
    write_manifest(bad, manifest)

    report = PAR.check(vlm, split_model(vlm), open_runtime("ort", bundle=bad), probes)
    failures = PAR.verdict(report, {"vision_encoder": "fp32", "token_embedding": "fp32", "text_decoder": "fp32"})
    assert failures and all(f.startswith("text_decoder") and "max abs logit diff" in f for f in failures), failures
    assert 1e-3 < report["text_decoder"]["teacher_forced"]["max_abs"] < 1e-2


def test_verify_catches_damage(fp32_bundle, tmp_path, capsys):
    assert main(["verify", "--bundle", str(fp32_bundle)]) == 0
    cases = {
        "modified": lambda b: (b / "tokenizer.json").write_text((b / "tokenizer.json").read_text() + " "),
        "missing": lambda b: (b / "generation.json").unlink(),
        "newer": lambda b: (b / "manifest.json").write_text(
            json.dumps({**json.loads((b / "manifest.json").read_text()), "format_version": 99})),
        "escape": lambda b: (b / "manifest.json").write_text(json.dumps(
            {**json.loads((b / "manifest.json").read_text()), "files": {"../evil": "0"}})),
    }
    words = {"modified": "was modified", "missing": "is missing", "newer": "newer", "escape": "outside"}
    for name, damage in cases.items():
        b = tmp_path / name
        shutil.copytree(fp32_bundle, b)
        damage(b)
        capsys.readouterr()
        assert main(["verify", "--bundle", str(b)]) == 2
        err = capsys.readouterr().err
        assert words[name] in err and err.count("\n") == 1, err


def test_ort_generation_without_torch_or_transformers(fp32_bundle, tmp_path):
    """The device path (generation, and `vlsi-edge bench`): numpy, Pillow, tokenizers and onnxruntime only."""
    from vlsi_edge.data.conversations import open_dataset

    sample = list(open_dataset(DATA, split="test"))[0]
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from vlsi_edge.runtimes.base import open_runtime
        from vlsi_edge.runtimes.generate import generate
        rt = open_runtime("ort", bundle={str(fp32_bundle)!r})
        out = generate(rt, {str(sample.image)!r}, {sample.turns[0].text!r}, max_new_tokens=4)
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        print("TOKENS", out.tokens)
        from vlsi_edge.cli import main                     # `vlsi-edge bench` on the device, too
        assert main(["bench", "--bundle", {str(fp32_bundle)!r}, "--backend", "ort", "--data", {DATA!r},
                     "--limit", "2", "--timing-tokens", "2", "--out", {str(tmp_path / "r.json")!r}]) == 0
        assert "torch" not in sys.modules and "transformers" not in sys.modules
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TOKENS [" in proc.stdout and json.loads((tmp_path / "r.json").read_text())["data"]["n"] == 2


@pytest.mark.parametrize("args, words", [
    (["--target", "tv"], "invalid choice"),
    (["--target", "onnx", "--precision", "fp16"], "onnx"),
    (["--target", "phone", "--precision", "decoder=int4"], "8da4w"),
    (["--target", "jetson", "--precision", "embedding=int8"], "fp16"),
])
def test_bad_export_arguments(args, words, tmp_path, capsys):
    with pytest.raises(SystemExit) if "tv" in args else _nothing():
        code = main(["export", "--model", "builtin:tiny-qwen2vl-student", "--out", str(tmp_path / "b"), *args])
        assert code == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_existing_output_and_non_model_folder(fp32_bundle, tmp_path, capsys):
    assert main(["export", "--model", "builtin:tiny-qwen2vl-student", "--target", "onnx",
                 "--out", str(fp32_bundle)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "notamodel").mkdir()
    assert main(["export", "--model", str(tmp_path / "notamodel"), "--target", "onnx",
                 "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b").exists()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.matrix
@pytest.mark.parametrize("family", ["qwen2_5vl", "llava_onevision", "smolvlm", "internvl", "gemma3"])
def test_onnx_export_every_family(family, tmp_path, train_briefly):
    """Each family's briefly trained student exports to ONNX, passes the fp32 gate and generates exactly what
    transformers generates."""
    student = train_briefly(family, tmp_path / "student", steps=30)
    out = tmp_path / "bundle"
    assert main(["export", "--model", str(student), "--target", "onnx", "--data", DATA, "--out", str(out)]) == 0
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"], report["failures"]
    assert report["generation"]["exact_match"] == 1.0
    assert report["text_decoder"]["generation_steps"]["top1"] == 1.0


def test_backend_must_fit_the_bundle_and_be_installed(fp32_bundle):
    from vlsi_edge.runtimes.base import open_runtime

    from vlsi_edge.errors import UserError

    for backend in ("executorch", "tensorrt"):
        with pytest.raises(UserError, match=f"backend {backend} cannot run a onnx bundle"):
            open_runtime(backend, bundle=fp32_bundle)
    with pytest.raises(UserError, match="unknown backend"):
        open_runtime("tflite", bundle=fp32_bundle)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["onnxruntime"] = None          # as if the onnx extra were not installed
        from vlsi_edge.errors import UserError
        from vlsi_edge.runtimes.base import open_runtime
        try:
            open_runtime("ort", bundle={str(fp32_bundle)!r})
        except UserError as e:
            print("ERR", e)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert "ERR backend ort needs onnxruntime" in proc.stdout and "vlsi-edge[onnx]" in proc.stdout, proc.stderr


@pytest.mark.slow  # a second full export (about 30 s on 2 cores)
def test_image_size_is_fixed_at_export(student, tmp_path, capsys):
    """Qwen2-VL exports at another multiple of 28 (more image tokens, 3-D positions from the new grid) and still
    passes the gate; a size that does not fit the patching is refused before anything is written."""
    assert main(["export", "--model", str(student), "--target", "onnx", "--image-size", "100", "--data", DATA,
                 "--out", str(tmp_path / "bad")]) == 2
    assert "multiple of 28" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    out = tmp_path / "140"
    assert main(["export", "--model", str(student), "--target", "onnx", "--image-size", "140", "--data", DATA,
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["n_image_tokens"] == 25 and manifest["model"]["position_scheme"]["grid"] == [5, 5]
    assert json.loads((out / "parity.json").read_text())["passed"]


def test_torch_reference_backend_runs_the_same_loop(student, fp32_bundle):
    """The host-side PyTorch backend (the split parts, untraced) and the ONNX bundle give the same tokens and
    logits through the one generation loop."""
    from vlsi_edge.runtimes.base import open_runtime
    from vlsi_edge.runtimes.generate import generate

    import vlsi_edge.torch_runtime  # noqa: F401  (registers "torch")
    from vlsi_edge.data.conversations import open_dataset

    ref = open_runtime("torch", model=str(student))
    ort = open_runtime("ort", bundle=fp32_bundle)
    for sample in list(open_dataset(DATA, split="test"))[:2]:
        a = generate(ref, sample.image, sample.turns[0].text, max_new_tokens=5, keep_logits=True)
        b = generate(ort, sample.image, sample.turns[0].text, max_new_tokens=5, keep_logits=True)
        assert a.tokens == b.tokens
        np.testing.assert_allclose(np.stack(a.step_logits), np.stack(b.step_logits), atol=1e-4, rtol=0)


def test_bench_ort_reports_latency_and_matches_eval(student, fp32_bundle, tmp_path, capsys):
    """`vlsi-edge bench` through ONNX Runtime: a readable table and the results JSON as the last stdout line; TTFT is
    the sum of its phases; the roofline counts the decoder's files; per-item answers, item ids, tokenizer and
    weights fingerprints equal `vlsi-edge eval`'s on the PyTorch student, so `report` can join them."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--bundle", str(fp32_bundle), "--backend", "ort", "--data", DATA, "--limit", "6",
                 "--threads", "1", "--timing-tokens", "4", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    doc = json.loads(lines[-1])
    assert doc == json.loads(out.read_text())
    assert any(line.strip().startswith("decode_tok_s") for line in lines[:-1])
    lat = doc["latency"]
    s = lat["stats"]
    assert lat["profile"] == "quick" and lat["runs"] == 10 and lat["max_new_tokens"] == 4
    assert s["ttft_ms"]["mean"] == pytest.approx(s["preprocess_ms"]["mean"] + s["vision_ms"]["mean"]
                                                 + s["prefill_ms"]["mean"])
    assert s["decode_tok_s"]["median"] > 0 and lat["peak_rss_mb"] > 50 and lat["load_ms"] > 0
    decoder_files = sum(p.stat().st_size for p in fp32_bundle.iterdir() if p.name.startswith("text_decoder"))
    assert lat["roofline"]["weight_bytes"] == decoder_files
    assert 0 < lat["roofline"]["fraction"] and lat["roofline"]["bandwidth_gb_s"] > 0
    assert doc["parity"]["passed"] is True

    assert main(["eval", "--model", str(student), "--data", DATA, "--limit", "6", "--batch-size", "1",
                 "--out", str(tmp_path / "eval.json")]) == 0
    ref = json.loads((tmp_path / "eval.json").read_text())
    assert [i["raw"] for i in doc["items"]] == [i["raw"] for i in ref["items"]]
    assert [i["id"] for i in doc["items"]] == [i["id"] for i in ref["items"]]
    for key in ("weights_fingerprint", "tokenizer_fingerprint"):
        assert doc["system"][key] == ref["system"][key]
    assert doc["metrics"]["overall"]["acc"] == ref["metrics"]["overall"]["acc"]


def test_bench_refuses_an_ungated_bundle_without_allow_ungated(fp32_bundle, tmp_path, capsys):
    from vlsi_edge.runtimes.bundle import read_manifest, write_manifest

    ungated = tmp_path / "ungated"
    shutil.copytree(fp32_bundle, ungated)
    manifest = read_manifest(ungated)
    manifest.pop("files")
    manifest["parity"] = {"mode": "off"}
    write_manifest(ungated, manifest)
    out = tmp_path / "r.json"
    assert main(["bench", "--bundle", str(ungated), "--backend", "ort", "--data", DATA, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--parity off" in err and "--allow-ungated" in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert main(["bench", "--bundle", str(ungated), "--backend", "ort", "--data", DATA, "--limit", "2",
                 "--allow-ungated", "--timing-tokens", "2", "--out", str(out)]) == 0
