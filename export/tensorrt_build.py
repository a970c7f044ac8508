"""Jetson extras: TensorRT optimisation profiles, engines (where TensorRT and a GPU exist) or the trtexec script.

TensorRT is imported lazily; it is not installable from PyPI on the machines this project is built on (STACK.md),
so the engine path is written against the TensorRT 10 Python API and exercised only on a machine that has it.
Engines are strongly typed (fp16 comes from the fp16 ONNX, int8 from the Q/DQ ONNX), go to `<bundle>/cache/`
with a timing cache, and record the device and TensorRT version that built them; a mismatch at load is refused.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

PROFILE = {"seq": (1, 128, 512), "past": (0, 128, 511)}


def profiles(facts: dict, max_seq: int = 512) -> dict:
    """min/opt/max shapes per dynamic input of each part (the vision encoder is static)."""
    from vlsi_edge.export.parts import decoder_shapes

    lo, opt, hi = PROFILE["seq"]
    plo, popt, phi = PROFILE["past"]
    hi, phi = min(hi, max_seq), min(phi, max_seq - 1)
    decoder = {name: [list(decoder_shapes(facts, s, p)[name]) for s, p in ((lo, plo), (opt, popt), (hi, phi))]
               for name in decoder_shapes(facts, 1, 0)}
    embedding = {"input_ids": [[1, lo], [1, opt], [1, hi]]}
    return {"text_decoder": decoder, "token_embedding": embedding}


def _shape_arg(shapes: dict, k: int) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, dims[k]))}" for name, dims in shapes.items())


def trtexec_script(parts: dict, prof: dict) -> str:
    lines = ["#!/bin/sh", "# Build TensorRT engines for this bundle on the Jetson itself (engines are device- and",
             "# TensorRT-version specific). Run from the bundle folder: sh build_engines.sh", "set -e",
             "mkdir -p cache"]
    for name, part in parts.items():
        cmd = ["trtexec", f"--onnx={part['file']}", f"--saveEngine=cache/{name}.engine", "--stronglyTyped",
               "--timingCacheFile=cache/timing.cache"]
        if name in prof:
            for flag, k in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
                cmd.append(f"{flag}={_shape_arg(prof[name], k)}")
        lines.append(" ".join(shlex.quote(c) for c in cmd))
    lines.append("trtexec --version > cache/tensorrt_version.txt 2>&1 || true")
    return "\n".join(lines) + "\n"


def tensorrt_available() -> str | None:
    """None when TensorRT and a CUDA GPU are usable, else the reason."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or the PyPI placeholder failing to load its libraries
        return f"TensorRT is not importable here ({type(exc).__name__})"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
    except ImportError:
        return "torch is not installed to query the GPU"
    return None


def build_engine(onnx_path: Path, engine_path: Path, prof: dict | None, timing_cache: Path) -> dict:
    """Build one strongly-typed engine with the TensorRT Python API; returns what built it."""
    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    if prof:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path.name}")
    engine_path.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"tensorrt": trt.__version__, "device": torch.cuda.get_device_name(0)}


def jetson_extras(facts: dict, root: Path, precisions: dict, build_engines: bool) -> dict:
    """Manifest entries for the jetson target (`facts`: the manifest's model block); writes build_engines.sh, or
    engines under cache/ when asked and possible."""
    prof = profiles(facts)
    parts = {name: {"file": f"{name}.onnx"} for name in ("vision_encoder", "token_embedding", "text_decoder")}
    (root / "build_engines.sh").write_text(trtexec_script(parts, prof), encoding="utf-8")
    trt_ep = ["TensorrtExecutionProvider", {"trt_fp16_enable": any(p == "fp16" for p in precisions.values()),
                                            "trt_engine_cache_enable": True, "trt_timing_cache_enable": True}]
    extras = {"tensorrt": {"profiles": prof, "engines": {}, "script": "build_engines.sh"},
              "runtime": {"ort": {"providers": [trt_ep, "CUDAExecutionProvider", "CPUExecutionProvider"]}}}
    if build_engines:
        reason = tensorrt_available()
        if reason:
            extras["tensorrt"]["not_built"] = f"{reason}; run build_engines.sh on the Jetson"
            print(f"vlsi-edge: --build-engines: {reason}; wrote build_engines.sh with the trtexec commands instead")
        else:
            cache = root / "cache"
            cache.mkdir(exist_ok=True)
            for name in parts:
                info = build_engine(root / f"{name}.onnx", cache / f"{name}.engine", prof.get(name),
                                    cache / "timing.cache")
                extras["tensorrt"]["engines"][name] = {"file": f"cache/{name}.engine", **info}
            (cache / "built_by.json").write_text(json.dumps(extras["tensorrt"]["engines"], indent=1))
    return extras
