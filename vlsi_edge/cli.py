"""The `vlsi-edge` command: one plain function per verb, flags from the signatures (see `_cli_args.py`).

    vlsi-edge --help
    vlsi-edge inspect --list
    vlsi-edge data synth --out data/shapes --n-test 500
    vlsi-edge eval --model builtin:tiny-qwen2vl-student --data builtin:shapes --split test --out preds.json

Device-safe: this module imports only the standard library at the top; each verb imports what it needs, and host
verbs check for Python ≥ 3.11 and the `host` extra first. User mistakes print one line and exit 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Literal

from vlsi_edge._cli_args import flag_names
from vlsi_edge.errors import UserError

HOST_MODULES = ("torch", "transformers", "safetensors")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _require_host(verb: str) -> None:
    if sys.version_info < (3, 11):
        raise UserError(f"`vlsi-edge {verb}` needs Python >= 3.11 (transformers 5.x); this is "
                        f"{sys.version.split()[0]}", "run the host verbs on a workstation, or use a 3.11+ venv")
    missing = [m for m in HOST_MODULES if not _importable(m)]
    if missing:
        raise UserError(f"`vlsi-edge {verb}` needs the host extra ({', '.join(missing)} not installed)",
                        "pip install 'vlsi-edge[host]' (with torch==2.13.0 in the same command)")


# --------------------------------------------------------------------------------------------------- verbs
@flag_names(json_out="--json", list_presets="--list")
def inspect(model: str | None = None, json_out: bool = False, list_presets: bool = False, verbalize: bool = False,
            image: str | None = None, prompt: str | None = None, max_tokens: int = 4) -> int:
    """Show a model's family, layers, hidden size, vocabulary, target layers, image tokens and parameters.

    Args:
        model: builtin:NAME, a checkpoint folder, a hub id, or (with --verbalize) a run folder
        json_out: print one JSON document instead of a table
        list_presets: list the supported families and built-in presets
        verbalize: print what each target layer's verbalizer says (teacher and student side by side)
        image: the image for --verbalize
        prompt: the question for --verbalize
        max_tokens: tokens each layer writes with --verbalize
    """
    _require_host("inspect")
    if verbalize:
        if not model or not prompt:
            raise UserError("--verbalize needs --model RUN and --prompt (and usually --image)")
        from vlsi_edge.distill.verbalize_view import inspect_run

        info = inspect_run(Path(model), image, prompt, max_tokens)
        if json_out:
            print(json.dumps(info))
            return 0
        for role, side in info.items():
            print(f"{role} ({side['model']})")
            for layer, text in side["layers"].items():
                print(f"  layer {layer:>3}: {text!r}")
        return 0
    from vlsi_edge.models import load_model, supported_model_types
    from vlsi_edge.models.presets import FAMILY_NAMES, PRESETS

    from vlsi_edge.models import pretrained

    if list_presets or model is None:
        info = {"families": list(FAMILY_NAMES), "model_types": supported_model_types(),
                "presets": [f"builtin:{n}" for n in PRESETS],
                "pretrained": [f"builtin:{n}" for n in pretrained.names()]}
        if json_out:
            print(json.dumps(info))
        else:
            print("families:    " + ", ".join(info["families"]))
            print("model types: " + ", ".join(info["model_types"]))
            print("presets:")
            for name, spec in PRESETS.items():
                print(f"  builtin:{name:34s} {spec.num_layers} layers x {spec.hidden_size}, targets "
                      f"{list(spec.target_layers)}, {spec.image_size}px")
            for name in pretrained.names():
                acc = pretrained.record(name).get("test_accuracy")
                print(f"  builtin:{name:34s} shipped weights" + (f", test accuracy {acc:.3f}" if acc else ""))
        return 0
    m = load_model(model)
    total = sum(p.numel() for p in m.model.parameters())
    lm = sum(p.numel() for p in m.decoder_layers.parameters()) + m.embed_tokens.weight.numel() \
        + m.lm_head.weight.numel() + sum(p.numel() for p in m.final_norm.parameters())
    info = {
        "model": m.source, "family": m.family, "model_type": m.model.config.model_type,
        "num_layers": m.num_layers, "hidden_size": m.hidden_size, "vocab_size": m.vocab_size,
        "tokenizer_size": len(m.tokenizer), "target_layers": m.target_layers, "image_size": m.image_size,
        "image_tokens": m.image_token_count(), "params": total, "params_language": lm,
        "params_vision": total - lm, "dtype": str(next(m.model.parameters()).dtype).removeprefix("torch."),
    }
    if json_out:
        print(json.dumps(info))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            if isinstance(v, int) and k.startswith("params"):
                v = f"{v:,}"
            print(f"{k:<{width}}  {v}")
    return 0


def data_synth(out: str, n_pretrain: int = 10000, n_train: int = 2000, n_val: int = 200, n_test: int = 1000,
               seed: int = 0, difficulty: int = 1, image_size: int = 112, captions: bool = False,
               n_curriculum: int = 0, scene_targets: bool = False, overwrite: bool = False) -> int:
    """Write the built-in synthetic suite (builtin:shapes) as LLaVA JSON files plus PNG images.

    Args:
        out: output folder (pretrain/train/val/test .json + images/)
        n_pretrain: items in the pretrain split (disjoint from the rest; used to pretrain tiny models)
        n_train: items in the train split
        n_val: items in the val split
        n_test: items in the test split
        seed: generator seed (same seed and sizes give byte-identical files)
        difficulty: 1..5: more objects, distractors and clutter
        image_size: side of the square images in pixels
        captions: end each pretrain grid item with a turn that names every cell of its grid
        n_curriculum: items in each warm-up stage before pretrain (solo-large, solo-small, pairs, triples; 0: none)
        scene_targets: give every grid item an `aux` list (its scene as numbers) for train.aux_weight
        overwrite: replace an existing non-empty folder
    """
    from vlsi_edge.data.shapes import synth

    for name, value in (("--n-pretrain", n_pretrain), ("--n-train", n_train), ("--n-val", n_val),
                        ("--n-test", n_test), ("--n-curriculum", n_curriculum)):
        if value < 0:
            raise UserError(f"{name} {value} is negative; expected a count >= 0")
    path = synth(Path(out), n_pretrain=n_pretrain, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed,
                 difficulty=difficulty, image_size=image_size, captions=int(captions), n_curriculum=n_curriculum,
                 scene_targets=int(scene_targets), overwrite=overwrite)
    info = json.loads((Path(path) / "info.json").read_text())
    counts = info.get("counts", {})
    print(f"wrote {path}: " + ", ".join(f"{k} {v if isinstance(v, int) else sum(v.values())}"
                                         for k, v in counts.items()))
    return 0


def eval(model: str, data: str, out: str, split: str = "test", batch_size: int = 16, max_new_tokens: int = 8,
         limit: int | None = None, image_root: str | None = None, skip_bad_samples: bool = False,
         dtype: Literal["float32", "bfloat16", "float16"] = "float32", device: str = "cpu",
         name: str | None = None, role: Literal["teacher", "student"] | None = None,
         scoring: Literal["generate", "choice"] = "generate") -> int:
    """Greedy per-item predictions of a PyTorch model on a split, with accuracy and 95% CIs (results JSON).

    Args:
        model: builtin:NAME, a checkpoint folder (e.g. RUN/student), or a hub id
        data: builtin:shapes, a .json/.jsonl file, or a folder with train/val/test files
        out: where to write the results JSON
        split: which split of --data to score
        batch_size: items per generate call
        max_new_tokens: answer length limit
        limit: score only the first N items
        image_root: folder that image paths are relative to (default: the data file's folder)
        skip_bad_samples: drop bad samples (reported) instead of stopping at the first
        dtype: model dtype
        device: torch device
        name: the system's name in reports (default: derived from --model)
        role: the system's role in reports (default: teacher when its name says so, else student)
        scoring: generate (greedy answer, parsed) or choice (the answer-set entry with the highest log-likelihood)
    """
    _require_host("eval")
    from vlsi_edge.evaluate import evaluate

    evaluate(model=model, data=data, out=Path(out), split=split, batch_size=batch_size,
             max_new_tokens=max_new_tokens, limit=limit, image_root=image_root, skip_bad=skip_bad_samples,
             dtype=dtype, device=device, name=name, role=role, scoring=scoring)
    return 0


def _distill_config(base: str | None, flags: dict, sets: list[str]):
    """A DistillConfig from a preset (YAML path or recipe name), then explicit flags, then --set key=value."""
    from vlsi_edge.config import DistillConfig, load_yaml, recipe_path, recipes

    overrides = {k: v for k, v in flags.items() if v is not None}
    for item in sets or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set train.batch_size=8")
        key, value = item.split("=", 1)
        overrides[key.strip()] = load_yaml(value)
    if base is None:
        return DistillConfig.from_dict({}, overrides)
    path = Path(base)
    if not path.exists() and base in recipes():
        path = recipe_path(base)
    elif not path.exists():
        raise UserError(f"--config {base}: no such file or recipe", "recipes: " + ", ".join(recipes()))
    return DistillConfig.from_yaml(path, overrides)


def _parse_steps(steps: str | None) -> dict | None:
    if steps is None:
        return None
    try:
        if "=" not in steps:
            n = int(steps)
            return {"verbalize": n, "interact": n, "sft": n, "kd": n}
        return {k.strip(): int(v) for k, v in (part.split("=") for part in steps.split(","))}
    except ValueError:
        raise UserError(f"--steps {steps!r}: expected N or stage=N,... (e.g. verbalize=100,interact=200,sft=100)") \
            from None


@flag_names(set_="--set")
def train(model: str, data: str, out: str, steps: int | None = None, config: str | None = None,
          split: str | None = None, batch_size: int | None = None, lr: float | None = None, seed: int | None = None,
          lora: bool | None = None, image_root: str | None = None, skip_bad_samples: bool | None = None,
          image_size: int | None = None, resume: bool = False, overwrite: bool = False,
          set_: list[str] | None = None) -> int:
    """Plain supervised fine-tuning (the same loop as `distill --method sft`); writes OUT/student/.

    Args:
        model: the model to train: builtin:NAME, a checkpoint folder, or a hub id
        data: builtin:shapes[:k=v,...], a .json/.jsonl file, or a folder with split files
        out: run folder (config.yaml, state/, metrics.jsonl, student/)
        steps: optimizer steps
        config: a YAML preset or a recipe name (flags override it)
        split: data split to train on (default train; pretraining uses pretrain; a+b: their union)
        batch_size: micro-batch size per process
        lr: peak learning rate
        seed: run seed (data order, initialisation of verbalizers, matching)
        lora: train LoRA adapters instead of all weights
        image_root: folder image paths are relative to
        skip_bad_samples: drop bad samples (reported) instead of stopping
        image_size: train at this square image size, a multiple of 28 (Qwen2-VL and Qwen2.5-VL; default the
            model's own); the saved model keeps it
        resume: continue the run in OUT from its last checkpoint
        overwrite: replace an existing OUT
        set_: extra config overrides, key=value (e.g. train.grad_accum=4)
    """
    _require_host("train")
    from vlsi_edge.distill.trainer import Trainer

    flags = {"method": "sft", "student": model, "teacher": None, "data": data, "split": split,
             "train.batch_size": batch_size, "optim.lr": lr, "train.seed": seed, "lora.enabled": lora,
             "image_root": image_root, "skip_bad_samples": skip_bad_samples, "student_image_size": image_size}
    if steps is not None:
        flags["steps"] = {"sft": steps}
    cfg = _distill_config(config, flags, set_ or [])
    Trainer(cfg, Path(out), resume=resume, overwrite=overwrite).run()
    return 0


@flag_names(set_="--set")
def distill(student: str | None = None, data: str | None = None, out: str | None = None,
            teacher: str | None = None, config: str | None = None,
            method: Literal["vlsi", "sft", "kd"] | None = None, stages: str | None = None,
            steps: str | None = None, split: str | None = None, batch_size: int | None = None,
            grad_accum: int | None = None, lr: float | None = None, seed: int | None = None,
            lora: bool | None = None, teacher_verbalizers: str | None = None, cache_teacher: str | None = None,
            image_root: str | None = None, skip_bad_samples: bool | None = None, resume: bool = False,
            overwrite: bool = False, set_: list[str] | None = None) -> int:
    """VLsI distillation (verbalize -> interact -> SFT), or the SFT / logit-KD baselines, in one loop.

    Args:
        student: the small model: builtin:NAME, a checkpoint folder, or a hub id
        data: builtin:shapes[:k=v,...], a .json/.jsonl file, or a folder with split files
        out: run folder (config.yaml, state/, metrics.jsonl, matching.json, verbalizers/, student/)
        teacher: the large model of the same family (not needed for --method sft)
        config: a YAML preset or a recipe name (flags override it)
        method: vlsi (the paper), sft (no teacher), or kd (final-logit distillation)
        stages: comma list from verbalize,interact,sft (vlsi only)
        steps: optimizer steps: N for every stage, or verbalize=N,interact=N,sft=N
        split: data split to train on (a+b: the union of splits a and b)
        batch_size: micro-batch size per process
        grad_accum: micro-batches per optimizer step
        lr: peak learning rate
        seed: run seed (data order, verbalizer init, matching samples)
        lora: train LoRA adapters instead of all student weights
        teacher_verbalizers: reuse trained teacher verbalizers (checked against the teacher and its layers)
        cache_teacher: folder for the precomputed top-k teacher cache
        image_root: folder image paths are relative to
        skip_bad_samples: drop bad samples (reported) instead of stopping
        resume: continue the run in OUT from its last checkpoint
        overwrite: replace an existing OUT
        set_: extra config overrides, key=value (e.g. matching.strategy=random loss.kl=reverse)
    """
    _require_host("distill")
    from vlsi_edge.distill.trainer import Trainer

    if out is None:
        raise UserError("--out is required", "e.g. --out runs/vlsi")
    flags = {"student": student, "teacher": teacher, "data": data, "method": method, "split": split,
             "train.batch_size": batch_size, "train.grad_accum": grad_accum, "optim.lr": lr, "train.seed": seed,
             "lora.enabled": lora, "teacher_verbalizers": teacher_verbalizers, "cache.dir": cache_teacher,
             "image_root": image_root, "skip_bad_samples": skip_bad_samples,
             "stages": [s.strip() for s in stages.split(",")] if stages else None}
    parsed = _parse_steps(steps)
    if parsed is not None:
        flags["steps"] = parsed
    cfg = _distill_config(config, flags, set_ or [])
    Trainer(cfg, Path(out), resume=resume, overwrite=overwrite).run()
    return 0


# ---------------------------------------------------------------------------------------------- plumbing
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + message otherwise)
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def export(model: str, target: Literal["jetson", "phone", "onnx"], out: str, precision: str | None = None,
           data: str = "builtin:shapes", overwrite: bool = False, parity: Literal["on", "off"] = "on",
           build_engines: bool = False, max_seq_len: int = 512, image_size: int | None = None) -> int:
    """Export a student (a checkpoint folder such as RUN/student, or builtin:NAME) as a verified bundle.

    Args:
        model: the model to export: RUN/student, a checkpoint folder, or builtin:NAME
        target: onnx (ONNX Runtime on CPU/ARM), jetson (TensorRT-ready ONNX) or phone (ExecuTorch .pte)
        out: bundle folder to create
        precision: one name (fp32, int8, int4, fp16, 8da8w, 8da4w) or vision=…,embedding=…,decoder=…
        data: dataset for parity probes and int8 calibration
        overwrite: replace an existing --out
        parity: on: gate the bundle against the PyTorch model (off only for random-weight benchmarks)
        build_engines: jetson: build TensorRT engines here (needs TensorRT and a GPU; else writes the script)
        max_seq_len: phone: the static KV cache length
        image_size: the square image size fixed into the vision encoder (default: the model's own)
    """
    _require_host("export")
    from vlsi_edge.export.pipeline import export_model

    path = export_model(model, target=target, out=out, precision=precision, data=data, overwrite=overwrite,
                        parity=parity, build_engines=build_engines, max_seq_len=max_seq_len,
                        image_size=image_size)
    print(f"wrote bundle {path}")
    return 0


def verify(bundle: str) -> int:
    """Check a bundle: format version, manifest schema, confined paths and the sha256 of every file.

    Args:
        bundle: the bundle folder (the --out of `vlsi-edge export`)
    """
    from vlsi_edge.runtimes.bundle import open_bundle

    b = open_bundle(bundle)
    parts = ", ".join(f"{name} ({part['precision']})" for name, part in b.parts.items())
    print(f"{bundle}: ok — {b.target} bundle of {b.model['family']}, {len(b.manifest['files'])} files verified; "
          f"parts {parts}")
    return 0


def bench(data: str = "builtin:shapes", backend: Literal["ort", "tensorrt", "executorch", "torch"] = "ort",
          bundle: str | None = None, model: str | None = None, out: str | None = None, split: str = "test",
          profile: Literal["quick", "full"] = "quick", limit: int | None = None, max_new_tokens: int = 8,
          timing_tokens: int | None = None, threads: int | None = None, allow_ungated: bool = False,
          emit_phone_kit: str | None = None, overwrite: bool = False) -> int:
    """Latency (BENCH.md) and per-item accuracy of a bundle on this device, in the versioned results schema.

    Args:
        data: the dataset whose split is scored (its first items are the timing prompts)
        backend: ort, tensorrt or executorch for a bundle; torch for a PyTorch model (--model)
        bundle: the bundle folder to run (from `vlsi-edge export`)
        model: with --backend torch: the PyTorch model (RUN/student, a checkpoint folder or builtin:NAME)
        out: where to write the results JSON (it is also the last line on stdout)
        split: which split of --data to score
        profile: quick (10 timed runs) or full (>= 20 runs and >= 60 s)
        limit: score only the first N items
        max_new_tokens: answer length limit when scoring
        timing_tokens: tokens per timing run (EOS ignored; default 16 quick, 64 full)
        threads: CPU threads for the backend (default: the backend's own choice)
        allow_ungated: accept a bundle exported with --parity off (speed-only benchmarks)
        emit_phone_kit: instead of benchmarking here, write an Android run kit for this phone bundle to this folder
        overwrite: with --emit-phone-kit: replace an existing kit folder
    """
    if emit_phone_kit:
        if not bundle:
            raise UserError("--emit-phone-kit needs --bundle (a phone bundle)")
        from vlsi_edge.benchmarks.phone_kit import emit_phone_kit as emit

        kit = emit(Path(bundle), data, Path(emit_phone_kit), split=split, limit=limit,
                   max_new_tokens=max_new_tokens, overwrite=overwrite)
        print(f"wrote phone kit {kit}: see {kit / 'README.md'}")
        return 0
    if backend == "torch":
        _require_host("bench --backend torch")
    from vlsi_edge.benchmarks.bench import bench as run, format_table, main_json_line

    doc = run(backend, data, out=Path(out) if out else None, bundle=bundle, model=model, split=split, profile=profile,
              limit=limit, max_new_tokens=max_new_tokens, timing_tokens=timing_tokens, threads=threads,
              allow_ungated=allow_ungated, log=_stderr_log)
    print(format_table(doc))
    print(main_json_line(doc))
    return 0


def demo(out: str = "demo-out", workers: int | None = None) -> int:
    """The whole pipeline on the built-in tiny models and data: distill, export, bench, report (<= 10 min, 2 cores).

    Args:
        out: folder for the data, runs, bundles, results, logs and report (replaced if it exists)
        workers: jobs at a time (default: up to 2, one thread each)
    """
    _require_host("demo")
    from vlsi_edge.demo import run_demo

    run_demo(Path(out), workers=workers)
    return 0


def _stderr_log(*args, file=None, **kwargs) -> None:
    print(*args, file=sys.stderr, **kwargs)


def report(inputs: list[str], /, out: str, run: str | None = None, teacher: str | None = None,
           overwrite: bool = False) -> int:
    """Join results JSONs (eval, bench, phone runs) by item id into OUT/report.md, report.html and report.json.

    Args:
        inputs: results JSON files (`eval`, `bench`), or collected phone-run folders
        out: folder to create for report.md, report.html (self-contained, with plots) and report.json
        run: a distillation run folder; its matching.json becomes the layer-matching heatmap
        teacher: the teacher's system name (default: the input whose system.role is teacher)
        overwrite: replace an existing --out
    """
    from vlsi_edge.benchmarks.report import write_report

    print(write_report(inputs, Path(out), run=Path(run) if run else None, teacher=teacher, overwrite=overwrite))
    return 0


VERBS = {"inspect": inspect, "train": train, "distill": distill, "eval": eval, "export": export, "verify": verify,
         "bench": bench, "report": report, "demo": demo}
GROUPS = {"data": {"synth": data_synth}}


def build_parser() -> argparse.ArgumentParser:
    from vlsi_edge import __version__
    from vlsi_edge._cli_args import add_function

    parser = _Parser(prog="vlsi-edge", description="VLsI distillation of small VLMs, exported to Jetson and phones.")
    parser.add_argument("--version", action="version", version=f"vlsi-edge {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    for name, fn in VERBS.items():
        add_function(sub, name, fn)
    for group, verbs in GROUPS.items():
        gp = sub.add_parser(group, help=f"{group} verbs: " + ", ".join(verbs))
        gsub = gp.add_subparsers(dest="sub", metavar="SUBVERB", parser_class=_Parser)
        gsub.required = True
        for name, fn in verbs.items():
            add_function(gsub, name, fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    from vlsi_edge._cli_args import call

    try:
        return int(call(ns) or 0)
    except UserError as e:
        sys.stderr.write(f"vlsi-edge: error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("vlsi-edge: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
