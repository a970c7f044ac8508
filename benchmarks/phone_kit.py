"""Phone runs without Python on the phone: write a kit that runs a phone bundle on an Android phone over adb with
ExecuTorch's C++ MultimodalRunner, then read the collected outputs back as a results document.

    vlsi-edge bench --bundle bundles/student-phone --data builtin:shapes --emit-phone-kit kits/student
    kits/student/run_on_phone.sh path/to/llava_main      # push, one runner process per item, pull into results/
    vlsi-edge report kits/student preds-teacher.json --out report        # report reads the kit folder

Kit layout (what `run_on_phone.sh` expects):

    KIT/kit.json              bundle facts, data spec, and per item: id, gold, choices, the exact runner prompts
    KIT/run_on_phone.sh       adb push, a discarded warm-up, one runner command line per item, adb pull
    KIT/README.md             build the runner, run, collect; what was verified where
    KIT/runner/main.cpp       the `llava_main` source that reads this kit (see RUNNER_CPP for why not the stock one)
    KIT/push/                 pushed to /data/local/tmp/vlsi-edge: model.pte, tokenizer.json,
                              images/<file>.png (RGB, already the bundle's input size),
                              prompts/<file>.{before,after}.txt
    KIT/results/              written by run_on_phone.sh: <file>.txt (the answer, then the runner's
                              `PyTorchObserver {json}` stats line), <file>.stats.json (that JSON alone), <file>.log

ExecuTorch's stock `llava_main` (examples/models/llava/main.cpp; flags model_path, tokenizer_path, prompt,
image_path, temperature, seq_len, cpu_threads) cannot run a vlsi-edge bundle: it loads only llama2.c tokenizers,
resizes every image so its longest edge is 336 (our vision encoder has a static S×S input), and puts LLaVA-1.5's
system prompt before the image. The kit therefore ships its own `main.cpp` for that same build target, written
against the runner API that the Python binding `executorch.extension.llm.runner` exposes (the tests drive that
binding on the kit's own files). Torch-free.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from vlsi_edge.errors import UserError

FORMAT = "vlsi-edge/phone-kit"
FORMAT_VERSION = 1
DEVICE_DIR = "/data/local/tmp/vlsi-edge"
RUNNER = "llava_main"
OBSERVER = "PyTorchObserver "        # the prefix of the stats line ExecuTorch's runner prints (stats.h print_report)
# fields of that JSON (executorch 1.5.1 `Stats.to_json_string`) that the latency figures need
STATS_FIELDS = ("prompt_tokens", "generated_tokens", "model_load_start_ms", "model_load_end_ms", "inference_start_ms",
                "inference_end_ms", "prompt_eval_end_ms", "first_token_ms", "SCALING_FACTOR_UNITS_PER_SECOND")
LATENCY_KEYS = ("ttft_ms", "tpot_ms", "decode_tok_s", "prefill_ms", "e2e_ms", "load_ms")
DEVICE_PROPS = ("ro.product.manufacturer", "ro.product.model", "ro.soc.model", "ro.board.platform",
                "ro.build.version.release")


# ----------------------------------------------------------------------------------------------------- emit
def _stems(ids) -> list[str]:
    """File-safe, unique names for item ids (they go into shell command lines and device paths)."""
    out, seen = [], set()
    for i, item_id in enumerate(ids):
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(item_id)).strip("._-") or f"item{i}"
        while stem in seen:
            stem = f"{stem}-{i}"
        seen.add(stem)
        out.append(stem)
    return out


def _split_prompt(bundle, token: str, question: str) -> tuple[str, str]:
    """(text before the image, text after it): the bundle's template with the image's token run cut out, as the
    MultimodalRunner takes it (each piece is tokenized on its own; the image embeddings take the run's place)."""
    head, tail = bundle.generation["template"].split("{prompt}")
    text = head + question + tail
    first, last = text.find(token), text.rfind(token) + len(token)
    if first < 0 or text[first:last] != token * text[first:last].count(token):
        raise UserError(f"bundle {bundle.root}: its prompt template does not hold one run of image tokens {token!r}",
                        "a phone kit runs one image per question; re-export the bundle with this vlsi-edge")
    return text[:first], text[last:]


def _samples(data: str, split: str, limit: int | None) -> list:
    from vlsi_edge.benchmarks.bench import image_samples

    return image_samples(data, split, limit, "for a phone kit", "a phone kit runs image questions only")


def emit_phone_kit(bundle: Path, data: str, out: Path, split: str = "test", limit: int | None = None,
                   max_new_tokens: int = 8, overwrite: bool = False) -> Path:
    """Write the Android run kit for phone bundle `bundle` on `data`'s `split` (first `limit` items) to `out`."""
    from PIL import Image
    from tokenizers import Tokenizer

    from vlsi_edge.fileio import publish_dir, staging_dir
    from vlsi_edge.runtimes.bundle import open_bundle
    from vlsi_edge.runtimes.preprocess import load_image

    bundle, out = Path(bundle), Path(out)
    if (limit is not None and limit < 1) or max_new_tokens < 1:
        raise UserError("--limit and --max-new-tokens must be >= 1")
    b = open_bundle(bundle)
    if b.target != "phone":
        raise UserError(f"bundle {bundle} is a {b.target} bundle; a phone kit runs a phone bundle (one model.pte)",
                        f"export one with `vlsi-edge export --target phone`, or bench this one here with --backend "
                        f"{'tensorrt' if b.target == 'jetson' else 'ort'}")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"kit folder {out} already exists", "pass --overwrite or choose another folder")
    samples = _samples(data, split, limit)
    m = b.manifest
    size, max_seq_len = int(b.model["image_size"]), int(m["decoder"]["max_seq_len"])
    pte = next(iter({part["file"] for part in b.parts.values()}))
    name = bundle.resolve().name
    image_token = Tokenizer.from_file(str(b.path("tokenizer.json"))).id_to_token(b.generation["image_token_id"])

    tmp = staging_dir(out)
    try:
        push = tmp / "push"
        (push / "images").mkdir(parents=True)
        (push / "prompts").mkdir()
        (tmp / "runner").mkdir()
        shutil.copyfile(b.path(pte), push / "model.pte")
        shutil.copyfile(b.path("tokenizer.json"), push / "tokenizer.json")
        items, images = [], {}
        for stem, s in zip(_stems(s.id for s in samples), samples):
            if str(s.image) not in images:       # one file per distinct image (several questions may share one)
                images[str(s.image)] = f"images/{stem}.png"
                pixels = load_image(s.image, size)                                     # (3, S, S) uint8
                Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0))).save(
                    push / images[str(s.image)])                                        # lossless: bytes survive
            before, after = _split_prompt(b, image_token, s.question)
            (push / "prompts" / f"{stem}.before.txt").write_bytes(before.encode("utf-8"))
            (push / "prompts" / f"{stem}.after.txt").write_bytes(after.encode("utf-8"))
            items.append({"id": s.id, "file": stem, "category": s.category, "cluster": s.cluster,
                          "question": s.question, "gold": s.answer, "choices": s.meta.get("choices"),
                          "prompt": {"before_image": before, "after_image": after},
                          "image": images[str(s.image)]})
        flags = {"model_path": "model.pte", "tokenizer_path": "tokenizer.json", "max_new_tokens": max_new_tokens,
                 "seq_len": max_seq_len, "temperature": 0}
        kit = {"format": FORMAT, "format_version": FORMAT_VERSION,
               "bundle": {"name": name, "path": str(bundle.resolve()), "target": b.target,
                          "family": m["source"].get("family"),
                          "precision": {part: spec["precision"] for part, spec in b.parts.items()},
                          "executorch": m["tools"].get("executorch"), "image_size": size, "max_seq_len": max_seq_len,
                          "parity": m.get("parity", {}).get("mode"),
                          "weights_fingerprint": m["source"].get("weights_fingerprint"),
                          "mb": (b.path(pte).stat().st_size + b.path("tokenizer.json").stat().st_size) / 2**20},
               "data": {"spec": data, "split": split, "limit": limit},
               "runner": {"binary": RUNNER, "source": "runner/main.cpp", "device_dir": DEVICE_DIR, "flags": flags,
                          "per_item": ["image_path", "preset_prompt_path", "prompt_path"], "warmup": 1},
               "items": items}
        (tmp / "kit.json").write_text(json.dumps(kit, indent=1) + "\n", encoding="utf-8")
        (tmp / "runner" / "main.cpp").write_text(RUNNER_CPP, encoding="utf-8")
        (tmp / "run_on_phone.sh").write_text(_run_script(items, flags), encoding="utf-8")
        (tmp / "run_on_phone.sh").chmod(0o755)
        (tmp / "README.md").write_text(README.format(name=name, n=len(items), version=kit["bundle"]["executorch"],
                                                     dev=DEVICE_DIR, runner=RUNNER, size=size,
                                                     max_new_tokens=max_new_tokens), encoding="utf-8")
        publish_dir(tmp, out, overwrite, lambda: UserError(f"kit folder {out} appeared while writing the kit",
                                                           "pass --overwrite or choose another folder"))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _run_script(items: list[dict], flags: dict) -> str:
    common = " ".join(f"--{k}={v}" for k, v in flags.items()) + " --cpu_threads=$THREADS"

    def command(item: dict, redirect: str) -> str:
        f = item["file"]
        return (f'"$ADB" shell "cd $DEV && LD_LIBRARY_PATH=. ./{RUNNER} $FLAGS --image_path={item["image"]} '
                f'--preset_prompt_path=prompts/{f}.before.txt --prompt_path=prompts/{f}.after.txt {redirect}"')

    lines = [f'echo "item {i + 1}/{len(items)}: {it["file"]}"\n' + command(
        it, f"> results/{it['file']}.txt 2> results/{it['file']}.log; "
            f"sed -n 's/^{OBSERVER}//p' results/{it['file']}.txt > results/{it['file']}.stats.json")
        for i, it in enumerate(items)]
    return RUN_SH.format(dev=DEVICE_DIR, runner=RUNNER, common=common, props=" ".join(DEVICE_PROPS),
                         warmup=command(items[0], "> /dev/null 2>&1"), items="\n".join(lines),
                         n=f"{len(items)} item{'s' if len(items) != 1 else ''}")


# --------------------------------------------------------------------------------------------------- ingest
def is_phone_results(path: Path) -> bool:
    """Whether `path` is a phone kit folder (collected or not: `ingest_phone_results` says what is missing)."""
    kit = Path(path) / "kit.json"
    if not kit.is_file():
        return False
    try:
        doc = json.loads(kit.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return True                      # ours by name, damaged: ingest names the problem
    return isinstance(doc, dict) and doc.get("format") == FORMAT


def _read_kit(root: Path) -> dict:
    path = root / "kit.json"
    again = "emit the kit again: vlsi-edge bench --bundle BUNDLE --emit-phone-kit DIR"
    if not path.is_file():
        raise UserError(f"{root} holds no kit.json, so it is not a phone kit", f"expected a folder from `{again}`")
    try:
        kit = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc})", again) from None
    if not isinstance(kit, dict) or kit.get("format") != FORMAT:
        raise UserError(f"{path} is not a vlsi-edge phone kit (format {FORMAT!r} expected)", again)
    if kit.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} is phone-kit version {kit.get('format_version')}; this vlsi-edge reads version "
                        f"{FORMAT_VERSION}", again)
    return kit


def _stats(text: str, path: Path) -> dict:
    """The runner's stats JSON, checked: every field the latency figures need, numeric, in time order."""
    try:
        stats = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: the runner's stats JSON is truncated or invalid ({exc})",
                        "run the kit again (./run_on_phone.sh) or look at the item's .log") from None
    missing = [k for k in STATS_FIELDS if not isinstance(stats, dict) or isinstance(stats.get(k), bool)
               or not isinstance(stats.get(k), (int, float))]
    if missing:
        raise UserError(f"{path}: the runner's stats lack {', '.join(missing)}",
                        f"expected the JSON of ExecuTorch's `{OBSERVER.strip()}` line; run the kit again")
    if stats["SCALING_FACTOR_UNITS_PER_SECOND"] <= 0 or not (
            stats["inference_start_ms"] <= stats["prompt_eval_end_ms"] <= stats["inference_end_ms"]):
        raise UserError(f"{path}: the runner's stats are inconsistent (time stamps out of order)", "run the kit again")
    return stats


def _collect(root: Path, item: dict) -> tuple[str, dict] | None:
    """(answer text, stats) of one item, or None when it has no output. Stats come from <file>.stats.json, else
    from the `PyTorchObserver` line in <file>.txt or <file>.log."""
    results, stem = root / "results", item["file"]
    txt, stats_file = results / f"{stem}.txt", results / f"{stem}.stats.json"
    if not txt.is_file():
        return None
    def read(p: Path) -> str:
        return p.read_bytes().decode("utf-8", errors="replace") if p.is_file() else ""

    out = read(txt)
    at = out.find(OBSERVER)
    answer = out[:at] if at >= 0 else out
    stats = None
    if read(stats_file).strip():
        stats = _stats(read(stats_file), stats_file)
    else:
        for source in (txt, results / f"{stem}.log"):
            text = read(source)
            if (pos := text.find(OBSERVER)) >= 0:
                stats = _stats(text[pos + len(OBSERVER):].split("\n", 1)[0], source)
                break
    if stats is None:
        return None
    echo = item["prompt"]["after_image"]
    if echo and answer.startswith(echo):       # a runner run with --echo prints the text after the image first
        answer = answer[len(echo):]
    return answer.strip(), stats


def _latency(runs: list[dict], warmup: int) -> dict:
    from vlsi_edge.benchmarks.bench import summary

    rows = []
    for s in runs:
        ms = 1e3 / s["SCALING_FACTOR_UNITS_PER_SECOND"]
        start, n = s["inference_start_ms"], s["generated_tokens"]
        tpot = (s["inference_end_ms"] - s["first_token_ms"]) * ms / n if n > 0 else None
        rows.append({"ttft_ms": (s["first_token_ms"] - start) * ms,
                     "prefill_ms": (s["prompt_eval_end_ms"] - start) * ms,
                     "e2e_ms": (s["inference_end_ms"] - start) * ms, "tpot_ms": tpot,
                     "decode_tok_s": 1e3 / tpot if tpot else None,
                     "load_ms": (s["model_load_end_ms"] - s["model_load_start_ms"]) * ms
                     if s["model_load_start_ms"] > 0 else None})
    stats = {k: summary(r[k] for r in rows if r[k] is not None) for k in LATENCY_KEYS}
    return {"profile": "phone", "runs": len(runs), "warmup": warmup, "stats": stats,
            "load_ms": stats["load_ms"]["median"],
            "mean_prompt_tokens": float(np.mean([s["prompt_tokens"] for s in runs])),
            "mean_new_tokens": float(np.mean([s["generated_tokens"] + 1 for s in runs])),   # + the prefill's token
            "clock_resolution_ms": 1e3 / runs[0]["SCALING_FACTOR_UNITS_PER_SECOND"],
            "method": "ExecuTorch runner stats, one runner process per item (load_ms is that process's load); "
                      "first_token_ms is stamped at the end of prefill, so TTFT = prefill (image + text); "
                      "TPOT = (inference_end - first_token) / generated_tokens; greedy until EOS or max_new_tokens"}


def _device(root: Path) -> dict:
    path = root / "results" / "device.txt"
    if not path.is_file():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text("utf-8", "replace").splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs if v.strip()}


def ingest_phone_results(path: Path) -> dict:
    """A collected kit folder → a results document (producer "phone"), scored like every other system."""
    from vlsi_edge.data.answers import score
    from vlsi_edge.data.scoring import summarize
    from vlsi_edge.results import make_results, tokenizer_fingerprint

    root = Path(path)
    kit = _read_kit(root)
    if not (root / "results").is_dir():
        raise UserError(f"{root}: no results/ folder, so the phone run was not collected",
                        f"run {root / 'run_on_phone.sh'} with the phone attached")
    items, runs, missing = [], [], []
    for item in kit["items"]:
        got = _collect(root, item)
        if got is None:
            missing.append(item)
            continue
        raw, stats = got
        parsed, correct = score(raw, item["gold"], item.get("choices"))
        items.append({"id": item["id"], "category": item["category"], "cluster": item["cluster"],
                      "question": item["question"], "gold": item["gold"], "raw": raw, "parsed": parsed,
                      "correct": bool(correct)})
        runs.append(stats)
    if missing:
        first = missing[0]
        raise UserError(f"{root}: {len(missing)} of {len(kit['items'])} items have no output (first: "
                        f"{first['id']}: results/{first['file']}.txt missing or without the runner's "
                        f"{OBSERVER.strip()} stats line)",
                        f"see results/{first['file']}.log and run ./run_on_phone.sh again")
    b = kit["bundle"]
    tokenizer = root / "push" / "tokenizer.json"
    system = {"name": f"{b['name']}-phone", "role": "export", "backend": "executorch-runner", "target": "phone",
              "family": b.get("family"), "bundle": b["name"], "precision": b["precision"],
              "executorch": b.get("executorch"), "weights_fingerprint": b.get("weights_fingerprint"),
              "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer.read_text(encoding="utf-8"))
              if tokenizer.is_file() else None}
    latency = {**_latency(runs, kit["runner"]["warmup"]), "max_new_tokens": kit["runner"]["flags"]["max_new_tokens"],
               "bundle_mb": b.get("mb")}
    data = {"spec": kit["data"]["spec"], "split": kit["data"]["split"]}
    return make_results("phone", system, data, items, summarize(items), latency=latency, device=_device(root),
                        kit={"path": str(root), "runner": kit["runner"]["binary"]})


# ------------------------------------------------------------------------------------------------ templates
RUN_SH = """#!/usr/bin/env bash
# Run this kit on an Android phone over adb (see README.md): push, a discarded warm-up, one {runner} run per item,
# then pull the outputs into results/ next to this script.
#   ./run_on_phone.sh [path/to/{runner}]      env: ADB (adb), ANDROID_SERIAL (which phone), CPU_THREADS (-1: auto)
set -euo pipefail
RUNNER="${{1:-$(dirname "$0")/bin/{runner}}}"
if [ ! -f "$RUNNER" ]; then
  echo "run_on_phone.sh: no runner at $RUNNER; build {runner} from runner/main.cpp (README.md), pass its path" >&2
  exit 2
fi
RUNNER="$(cd "$(dirname "$RUNNER")" && pwd)/$(basename "$RUNNER")"
cd "$(dirname "$0")"
ADB="${{ADB:-adb}}"
THREADS="${{CPU_THREADS:--1}}"
DEV={dev}
FLAGS="{common}"
"$ADB" shell "rm -rf $DEV && mkdir -p $DEV/results"
"$ADB" push push/model.pte push/tokenizer.json "$DEV/"
"$ADB" push push/images "$DEV/"
"$ADB" push push/prompts "$DEV/"
"$ADB" push "$RUNNER" "$DEV/{runner}"
"$ADB" shell "chmod 755 $DEV/{runner}"
echo "warm-up (discarded)"
{warmup} || true
{items}
rm -rf results
"$ADB" pull "$DEV/results" .
{{ echo "cpu_threads=$THREADS"
  for p in {props}; do echo "$p=$("$ADB" shell getprop "$p" | tr -d '\\r')"; done
}} > results/device.txt
echo "collected {n} into $(pwd)/results; next: vlsi-edge report $(pwd) [other results JSONs] --out report"
"""

README = """# Phone kit: {name} on {n} items

Runs the phone bundle `{name}` on an Android phone with ExecuTorch's C++ MultimodalRunner, then turns what the
phone printed into a vlsi-edge results document (`vlsi-edge report` reads this folder).

## 1. Build the runner (once per ExecuTorch version)

The `.pte` was written by **executorch {version}**: build the runner from the same release (`git checkout
v{version}`), since another runtime version may refuse the program.

ExecuTorch's stock `{runner}` (`examples/models/llava/main.cpp`) cannot run this bundle: it loads only llama2.c
tokenizers (this bundle has an HF `tokenizer.json`), resizes images so the longest edge is 336 (this program's
vision encoder takes exactly {size}×{size}), and puts LLaVA-1.5's system prompt before the image. Copy
`runner/main.cpp` over `examples/models/llava/main.cpp` and build the `{runner}` target for Android arm64 as that
folder's README and `CMakeLists.txt` describe (ExecuTorch built with the Android NDK toolchain,
`-DANDROID_ABI=arm64-v8a`, XNNPACK, the quantized and custom kernels, the LLM runner and tokenizers extensions;
check the exact CMake options of your version in `examples/models/llava/README.md` and `.ci/scripts/test_llava.sh`).
Its flags: `--model_path --tokenizer_path --image_path --preset_prompt_path --prompt_path --prompt --max_new_tokens
--seq_len --temperature --cpu_threads --echo`.

## 2. Run

    ./run_on_phone.sh path/to/{runner}          # ANDROID_SERIAL=... to pick a phone, CPU_THREADS=4 to pin threads

It pushes `push/` to `{dev}`, runs one discarded warm-up, then one runner process per item (greedy, at most
{max_new_tokens} new tokens), each writing `results/<item>.txt` (the answer, a newline, then the runner's
`PyTorchObserver {{json}}` stats line), `results/<item>.log` (its log) and `results/<item>.stats.json` (the stats line's
JSON), and pulls `results/` here with the phone's properties in `results/device.txt`. If the binary needs shared
libraries (e.g. `libc++_shared.so`), push them to `{dev}` too.

## 3. Collect

    vlsi-edge report . ../preds-teacher.json --out report

scores every answer with the one answer parser and turns the stats into TTFT, TPOT, decode tok/s, prefill, end-to-end
and load times. An item without output or with truncated stats is refused by name.

## What was checked, and what you must check

- Checked on the host that wrote this kit, with executorch's Python binding of the same C++ MultimodalRunner
  (`executorch.extension.llm.runner`): the runner answers from this kit's PNG images and prompt files; the PNGs
  hold exactly the pixels the Python runtime feeds the vision encoder, the prompt files exactly the bundle's
  template around the question, cut where the image's token run goes; the stats JSON fields and the stdout layout
  (answer, newline, `PyTorchObserver` line) are what the collector parses; `run_on_phone.sh` itself ran against an
  adb stand-in.
- Read in ExecuTorch's source, not compiled here: the stock `{runner}`'s flags and behaviour above, and the runner
  API `runner/main.cpp` uses (`load_tokenizer`, `create_multimodal_runner`, `make_text_input`,
  `make_image_input`, `GenerationConfig`). Compiling it for your ExecuTorch version and running it on a phone were
  not done here: check both, and that `results/*.txt` holds the answers.
- Prompts are pre-templated: the files hold the bundle's chat template around the question, split where the
  image goes, read byte for byte (the template ends in a newline that shell quoting would lose).
"""

RUNNER_CPP = r"""// vlsi-edge phone runner: one image question through ExecuTorch's MultimodalRunner. Built as the
// `llava_main` target of ExecuTorch's examples/models/llava (this file replaces that folder's main.cpp).
//
//   llava_main --model_path=model.pte --tokenizer_path=tokenizer.json --image_path=images/x.png \
//       --preset_prompt_path=prompts/x.before.txt --prompt_path=prompts/x.after.txt --max_new_tokens=8 \
//       --temperature=0 --cpu_threads=4 > results/x.txt
//
// stdout: the generated text, a newline, then the runner's `PyTorchObserver {...}` stats line. The image is used at
// its stored size (the kit's PNGs already have the program's input size); the tokenizer is whatever
// load_tokenizer() detects (an HF tokenizer.json here); the prompt files are read byte for byte.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <gflags/gflags.h>

#include <executorch/extension/llm/runner/image.h>
#include <executorch/extension/llm/runner/llm_runner_helper.h>
#include <executorch/extension/llm/runner/multimodal_input.h>
#include <executorch/extension/llm/runner/multimodal_runner.h>
#include <executorch/runtime/platform/log.h>

#define STB_IMAGE_IMPLEMENTATION
#include <stb_image.h>

#if defined(ET_USE_THREADPOOL)
#include <executorch/extension/threadpool/cpuinfo_utils.h>
#include <executorch/extension/threadpool/threadpool.h>
#endif

DEFINE_string(model_path, "model.pte", "ExecuTorch program with vision_encoder, token_embedding, text_decoder.");
DEFINE_string(tokenizer_path, "tokenizer.json", "Tokenizer file (HF tokenizer.json, tiktoken, sentencepiece).");
DEFINE_string(image_path, "", "RGB image (PNG, JPEG, BMP) at the program's input size; not resized.");
DEFINE_string(preset_prompt_path, "", "File with the prompt text before the image.");
DEFINE_string(prompt_path, "", "File with the prompt text after the image.");
DEFINE_string(prompt, "", "Prompt text after the image, used when --prompt_path is empty.");
DEFINE_double(temperature, 0.0, "Sampling temperature; 0 is greedy.");
DEFINE_int32(max_new_tokens, -1, "Most tokens to generate; -1: until EOS or the context is full.");
DEFINE_int32(seq_len, -1, "Most prompt + generated tokens; -1: the program's context length.");
DEFINE_int32(cpu_threads, -1, "CPU threads; -1: the number of performant cores.");
DEFINE_bool(echo, false, "Print the text after the image before the answer.");

namespace llm = ::executorch::extension::llm;

namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    ET_LOG(Error, "cannot read %s", path.c_str());
    std::exit(1);
  }
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

llm::Image read_image(const std::string& path) {
  int width = 0, height = 0, channels = 0;
  unsigned char* hwc = stbi_load(path.c_str(), &width, &height, &channels, 3);  // forced to 3 channels
  if (hwc == nullptr) {
    ET_LOG(Error, "cannot decode image %s", path.c_str());
    std::exit(1);
  }
  const size_t plane = static_cast<size_t>(width) * static_cast<size_t>(height);
  std::vector<uint8_t> chw(3 * plane);
  for (size_t i = 0; i < plane; ++i) {
    for (size_t c = 0; c < 3; ++c) {
      chw[c * plane + i] = hwc[i * 3 + c];
    }
  }
  stbi_image_free(hwc);
  return llm::Image(std::move(chw), width, height, 3);
}

}  // namespace

int main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
#if defined(ET_USE_THREADPOOL)
  const uint32_t threads = FLAGS_cpu_threads == -1
      ? ::executorch::extension::cpuinfo::get_num_performant_cores()
      : static_cast<uint32_t>(FLAGS_cpu_threads);
  if (threads > 0) {
    ::executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(threads);
  }
#endif
  auto tokenizer = llm::load_tokenizer(FLAGS_tokenizer_path);
  if (tokenizer == nullptr) {
    ET_LOG(Error, "cannot load tokenizer %s", FLAGS_tokenizer_path.c_str());
    return 1;
  }
  // not loaded here: generate() loads it and records model_load_start_ms / model_load_end_ms in the stats
  auto runner = llm::create_multimodal_runner(FLAGS_model_path, std::move(tokenizer));
  if (runner == nullptr) {
    ET_LOG(Error, "cannot create a multimodal runner for %s", FLAGS_model_path.c_str());
    return 1;
  }
  const std::string before = FLAGS_preset_prompt_path.empty() ? std::string() : read_file(FLAGS_preset_prompt_path);
  const std::string after = FLAGS_prompt_path.empty() ? FLAGS_prompt : read_file(FLAGS_prompt_path);
  std::vector<llm::MultimodalInput> inputs;
  if (!before.empty()) {
    inputs.push_back(llm::make_text_input(before));
  }
  inputs.push_back(llm::make_image_input(read_image(FLAGS_image_path)));
  if (!after.empty()) {
    inputs.push_back(llm::make_text_input(after));
  }
  llm::GenerationConfig config;
  config.temperature = static_cast<float>(FLAGS_temperature);
  config.max_new_tokens = FLAGS_max_new_tokens;
  config.seq_len = FLAGS_seq_len;
  config.echo = FLAGS_echo;
  if (runner->generate(inputs, config) != ::executorch::runtime::Error::Ok) {
    ET_LOG(Error, "generation failed");
    return 1;
  }
  std::fflush(stdout);
  return 0;
}
"""
