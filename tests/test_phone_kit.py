"""Phone kit: emit the Android run kit of a tiny phone bundle, run it as the phone would — ExecuTorch's C++
MultimodalRunner (through its Python binding) on the kit's own image and prompt files, its stdout and stats laid out
in results/ as run_on_phone.sh collects them — and ingest that into a results document. Damaged results (truncated
stats, a missing item, another kit version) and a non-phone bundle are refused in one line."""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("executorch")

from vlsi_edge.benchmarks.phone_kit import OBSERVER, emit_phone_kit, ingest_phone_results, is_phone_results
from vlsi_edge.errors import UserError

DATA = "builtin:shapes:n_pretrain=0,n_train=64,n_val=16,n_test=16"
MODEL = "builtin:tiny-llava_onevision-student"     # random init is enough: the kit's plumbing is under test


@pytest.fixture(scope="module")
def env(tmp_path_factory, torch_threads):
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(1)
    with pytest.MonkeyPatch.context() as mp:      # module fixtures run before conftest's per-test cache folder
        mp.setenv("VLSI_EDGE_CACHE", str(tmp_path_factory.getbasetemp() / "vlsi_cache"))
        yield


@pytest.fixture(scope="module")
def bundle(env, tmp_path_factory):
    from vlsi_edge.cli import main

    out = tmp_path_factory.mktemp("bundles") / "tiny-phone"
    assert main(["export", "--model", MODEL, "--target", "phone", "--parity", "off", "--data", DATA,
                 "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def kit(env, bundle, tmp_path_factory):
    # 16 new tokens: the decode interval stays well above the runner's 1 ms clock
    return emit_phone_kit(bundle, DATA, tmp_path_factory.mktemp("kits") / "kit", limit=3, max_new_tokens=16)


def _run_like_the_phone(kit):
    """What run_on_phone.sh does for each item, with the binding of the same C++ runner: the runner's stdout (the
    answer, then its PyTorchObserver stats line) → results/<file>.txt, the stats JSON → results/<file>.stats.json.
    Returns {file: stdout text}."""
    import executorch.kernels.quantized  # noqa: F401  (int8 embedding kernels, shared with the runner)
    import torch
    from executorch.extension.llm.runner import GenerationConfig, MultimodalRunner, make_image_input, make_text_input
    from PIL import Image

    doc = json.loads((kit / "kit.json").read_text())
    push, results, flags = kit / "push", kit / "results", doc["runner"]["flags"]
    results.mkdir()
    runner = MultimodalRunner(str(push / flags["model_path"]), str(push / flags["tokenizer_path"]))
    libc = ctypes.CDLL(None)
    outputs = {}
    for item in doc["items"]:
        f = item["file"]
        before, after = ((push / "prompts" / f"{f}.{part}.txt").read_bytes().decode() for part in ("before", "after"))
        png = Image.open(push / item["image"])
        assert png.mode == "RGB"                       # the runner's stbi_load(..., 3) reads it as is
        pixels = torch.from_numpy(np.ascontiguousarray(np.asarray(png).transpose(2, 0, 1)))       # (3, S, S)
        stats = []
        sys.stdout.flush()
        libc.fflush(None)
        saved = os.dup(1)
        with open(results / f"{f}.txt", "wb") as out:  # the C++ runner prints to file descriptor 1
            os.dup2(out.fileno(), 1)
            try:
                runner.reset()
                runner.generate([make_text_input(before), make_image_input(pixels), make_text_input(after)],
                                GenerationConfig(max_new_tokens=flags["max_new_tokens"], seq_len=flags["seq_len"],
                                                 temperature=0.0, echo=False), None, stats.append)
            finally:
                libc.fflush(None)
                os.dup2(saved, 1)
                os.close(saved)
        (results / f"{f}.stats.json").write_text(stats[0].to_json_string())
        outputs[f] = (results / f"{f}.txt").read_text()
    return outputs


@pytest.fixture(scope="module")
def collected(kit, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "kit"
    shutil.copytree(kit, run)
    return run, _run_like_the_phone(run)


def _one_line_error(fn, *args) -> str:
    with pytest.raises(UserError) as err:
        fn(*args)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_kit_layout_and_items(kit, bundle):
    from PIL import Image

    from vlsi_edge.data.conversations import open_dataset
    from vlsi_edge.runtimes.bundle import open_bundle
    from vlsi_edge.runtimes.preprocess import load_image

    b = open_bundle(bundle)
    doc = json.loads((kit / "kit.json").read_text())
    assert sorted(p.name for p in kit.iterdir()) == ["README.md", "kit.json", "push", "run_on_phone.sh", "runner"]
    assert (kit / "push" / "model.pte").read_bytes() == (bundle / "model.pte").read_bytes()
    assert (kit / "push" / "tokenizer.json").read_bytes() == (bundle / "tokenizer.json").read_bytes()
    assert doc["bundle"]["name"] == "tiny-phone" and doc["bundle"]["target"] == "phone"
    assert doc["bundle"]["precision"] == {k: p["precision"] for k, p in b.parts.items()}
    assert doc["bundle"]["executorch"] == b.manifest["tools"]["executorch"]
    assert doc["data"] == {"spec": DATA, "split": "test", "limit": 3}

    samples = list(open_dataset(DATA, split="test"))[:3]
    head, tail = b.generation["template"].split("{prompt}")
    size = b.model["image_size"]
    assert [i["id"] for i in doc["items"]] == [s.id for s in samples]
    for item, s in zip(doc["items"], samples):
        assert (item["category"], item["cluster"], item["question"], item["gold"], item["choices"]) == (
            s.category, s.cluster, s.question, s.answer, s.meta.get("choices"))
        before, after = item["prompt"]["before_image"], item["prompt"]["after_image"]
        text = head + s.question + tail                     # the prompt minus the image's token run, byte for byte
        middle = text[len(before):len(text) - len(after)]
        assert text.startswith(before) and text.endswith(after) and set(middle.split(">")) == {"<image", ""}
        assert (kit / "push" / "prompts" / f"{item['file']}.after.txt").read_bytes() == after.encode()
        png = np.asarray(Image.open(kit / "push" / item["image"])).transpose(2, 0, 1)
        np.testing.assert_array_equal(png, load_image(s.image, size))       # resized as the host does, lossless

    script = (kit / "run_on_phone.sh").read_text()
    assert os.access(kit / "run_on_phone.sh", os.X_OK)
    assert script.count("./llava_main ") == 3 + 1                          # one per item + the warm-up
    assert "adb" in script and '"$ADB" pull "$DEV/results" .' in script
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n", str(kit / "run_on_phone.sh")], check=False).returncode == 0
    assert "executorch " + doc["bundle"]["executorch"] in (kit / "README.md").read_text()
    assert "load_tokenizer" in (kit / "runner" / "main.cpp").read_text()
    assert is_phone_results(kit) and not is_phone_results(bundle) and not is_phone_results(kit / "kit.json")


def test_phone_run_ingests_into_a_results_document(collected):
    from vlsi_edge.data.answers import score
    from vlsi_edge.results import SCHEMA

    run, outputs = collected
    doc = ingest_phone_results(run)
    kit = json.loads((run / "kit.json").read_text())
    assert doc["schema"] == SCHEMA and doc["producer"] == "phone" and doc["data"]["n"] == 3
    assert doc["system"]["name"] == "tiny-phone-phone" and doc["system"]["backend"] == "executorch-runner"
    assert doc["system"]["precision"] == kit["bundle"]["precision"] and doc["system"]["tokenizer_fingerprint"]
    for item, k in zip(doc["items"], kit["items"]):
        stdout = outputs[k["file"]]
        answer, observer = stdout.split(OBSERVER)
        assert json.loads(observer) == json.loads((run / "results" / f"{k['file']}.stats.json").read_text())
        assert item["raw"] == answer.strip()
        assert (item["parsed"], item["correct"]) == score(item["raw"], k["gold"], k["choices"])
    overall = doc["metrics"]["overall"]
    assert overall["n"] == 3 and 0 <= overall["acc"] <= 1 and 0 <= overall["parse_failure_rate"] <= 1
    lat = doc["latency"]
    assert lat["profile"] == "phone" and lat["runs"] == 3
    assert set(lat["stats"]) == {"ttft_ms", "tpot_ms", "decode_tok_s", "prefill_ms", "e2e_ms", "load_ms"}
    for key, stat in lat["stats"].items():
        assert set(stat) == {"mean", "median", "p90", "p99", "stdev"}, key
        assert stat["mean"] > 0 and stat["p99"] >= stat["median"] > 0, (key, stat)

    # the stats line inside the runner's stdout is enough: without the .stats.json files the same numbers come back
    bare = run.parent / "bare"
    shutil.copytree(run, bare)
    for p in (bare / "results").glob("*.stats.json"):
        p.unlink()
    again = ingest_phone_results(bare)
    assert again["latency"]["stats"] == lat["stats"] and again["items"] == doc["items"]


FAKE_ADB = r"""#!/usr/bin/env bash
# adb stand-in: the "phone" is the folder $PHONE; /data/local/tmp maps into it
set -e
map() { printf '%s' "$1" | sed "s#/data/local/tmp#$PHONE#g"; }
cmd="$1"; shift
case "$cmd" in
  shell) case "$1" in getprop) echo "stand-in" ;; *) sh -c "$(map "$*")" ;; esac ;;
  push) args=(); for a in "$@"; do args+=("$(map "$a")"); done; cp -r "${args[@]}" ;;
  pull) cp -r "$(map "$1")" "$2" ;;
  *) exit 1 ;;
esac
"""

FAKE_RUNNER = """#!{python}
# llava_main stand-in: runner/main.cpp's flags, the same C++ MultimodalRunner through its Python binding
import sys
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:])
import numpy as np, torch
import executorch.kernels.quantized
from executorch.extension.pybindings import portable_lib
from executorch.extension.llm.runner import GenerationConfig, MultimodalRunner, make_image_input, make_text_input
from PIL import Image
if int(flags["cpu_threads"]) > 0:
    portable_lib._unsafe_reset_threadpool(int(flags["cpu_threads"]))
read = lambda key: open(flags[key], "rb").read().decode() if flags.get(key) else ""
hwc = np.asarray(Image.open(flags["image_path"]).convert("RGB"))
inputs = [make_text_input(read("preset_prompt_path")),
          make_image_input(torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))),
          make_text_input(read("prompt_path") or flags.get("prompt", ""))]
config = GenerationConfig(max_new_tokens=int(flags["max_new_tokens"]), seq_len=int(flags["seq_len"]),
                          temperature=float(flags["temperature"]), echo=False)
MultimodalRunner(flags["model_path"], flags["tokenizer_path"]).generate(inputs, config, None, None)
"""


@pytest.mark.skipif(not shutil.which("bash"), reason="run_on_phone.sh is a bash script")
def test_run_on_phone_script_with_stand_in_adb_and_runner(bundle, collected, tmp_path):
    """run_on_phone.sh end to end on a one-item kit: pushes, the warm-up and item command lines, the sed-extracted
    stats, the pull into results/; the phone is a folder, llava_main a stand-in driving the same runner."""
    run = emit_phone_kit(bundle, DATA, tmp_path / "kit", limit=1, max_new_tokens=16)
    (tmp_path / "phone").mkdir()
    for name, text in (("adb", FAKE_ADB), ("llava_main", FAKE_RUNNER.format(python=sys.executable))):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    env = {**os.environ, "ADB": str(tmp_path / "adb"), "PHONE": str(tmp_path / "phone"), "CPU_THREADS": "1"}
    done = subprocess.run(["bash", str(run / "run_on_phone.sh"), str(tmp_path / "llava_main")], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "collected 1 item into" in done.stdout
    doc = ingest_phone_results(run)
    assert doc["items"] == ingest_phone_results(collected[0])["items"][:1]          # the same answer
    assert doc["device"]["cpu_threads"] == "1" and doc["device"]["ro.product.model"] == "stand-in"
    assert doc["latency"]["stats"]["e2e_ms"]["mean"] > 0


def test_truncated_stats_are_refused(collected, tmp_path):
    run = tmp_path / "kit"
    shutil.copytree(collected[0], run)
    stats = sorted((run / "results").glob("*.stats.json"))[1]
    stats.write_text(stats.read_text()[:40])
    message = _one_line_error(ingest_phone_results, run)
    assert stats.name in message and "truncated" in message


def test_missing_item_is_refused(collected, tmp_path):
    run = tmp_path / "kit"
    shutil.copytree(collected[0], run)
    first = json.loads((run / "kit.json").read_text())["items"][0]
    (run / "results" / f"{first['file']}.txt").unlink()
    message = _one_line_error(ingest_phone_results, run)
    assert "1 of 3 items" in message and first["id"] in message and f"{first['file']}.txt" in message


def test_other_kit_version_and_uncollected_kit_are_refused(kit, tmp_path):
    message = _one_line_error(ingest_phone_results, kit)
    assert "results/" in message and "run_on_phone.sh" in message
    old = tmp_path / "old"
    shutil.copytree(kit, old)
    doc = json.loads((old / "kit.json").read_text())
    doc["format_version"] = 99
    (old / "kit.json").write_text(json.dumps(doc))
    message = _one_line_error(ingest_phone_results, old)
    assert "kit.json" in message and "99" in message


def test_non_phone_bundle_is_refused(bundle, tmp_path):
    from vlsi_edge.runtimes.bundle import read_manifest, write_manifest

    onnx = tmp_path / "onnx-bundle"
    shutil.copytree(bundle, onnx)
    manifest = read_manifest(onnx)
    manifest.pop("files")
    manifest["target"] = "onnx"
    write_manifest(onnx, manifest)
    message = _one_line_error(emit_phone_kit, onnx, DATA, tmp_path / "kit")
    assert "onnx bundle" in message and "--target phone" in message
    assert not (tmp_path / "kit").exists()
