"""Parts → ONNX files (targets `onnx` and `jetson`), then the precision passes.

Every part goes through `torch.onnx.export(dynamo=True)` with explicit dynamic shapes, opset 18, external data from
the start (a 0.5B decoder is near protobuf's 2 GB limit), then an onnxslim pass. Precisions:
- onnx:   int8 = ONNX Runtime dynamic quantization (MatMul weights int8, activations quantized per call);
          int4 = weight-only 4-bit blocks (`MatMulNBits`, block 32, symmetric).
- jetson: fp16 = the graph converted to fp16 with fp32 inputs/outputs kept (`keep_io_types`);
          int8 = Q/DQ ONNX, statically calibrated on decoder inputs gathered from `--data` (what TensorRT 10 builds
          as a strongly-typed network).
"""
from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np


def _data_name(path: Path) -> str:
    return path.name + ".data"


def save_onnx(model, path: Path) -> list[str]:
    """Save with all weights in one external data file beside it; returns the files written (names)."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.parent / _data_name(path)):
        stale.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=_data_name(path), size_threshold=1024)
    return [p.name for p in (path, path.parent / _data_name(path)) if p.exists()]


def export_part(part, path: Path, opset: int = 18) -> list[str]:
    """torch module → ONNX at `path` (+ `path.data`), slimmed."""
    import onnx
    import onnxslim
    import torch

    tmp = path.with_suffix(".raw.onnx")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)   # "torchvision is not installed" per export
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(part.module, part.example, str(tmp), dynamo=True, opset_version=opset,
                          input_names=part.input_names, output_names=part.output_names,
                          dynamic_shapes=part.dynamic, external_data=True, verbose=False)
    model = onnx.load(str(tmp))
    slim = onnxslim.slim(model)
    files = save_onnx(slim if slim is not None else model, path)
    for p in tmp.parent.glob(tmp.name + "*"):
        p.unlink()
    return files


def quantize_int8_dynamic(path: Path) -> list[str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_suffix(".int8.onnx")
    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                     use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
    return _replace(out, path)


def quantize_int4(path: Path, block_size: int = 32) -> list[str]:
    """Weight-only 4-bit blocks (`MatMulNBits`) on every weight matmul but the lm_head, which stays fp32 (as
    llama.cpp keeps its output layer at higher precision: 4-bit logits cost the most agreement per byte saved)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = onnx.load(str(path))
    head = [n.name for n in model.graph.node if "logits" in n.output]
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=head, algo_config=DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, bits=4))
    quantizer.process()
    return save_onnx(quantizer.model.model, path)


def convert_fp16(path: Path) -> list[str]:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path))
    fp16 = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    return save_onnx(toposort(fp16), path)


def toposort(model):
    """Nodes in topological order (the fp16 converter appends its input casts at the end, which TensorRT's
    parser and `polygraphy check lint` reject)."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.toposort()
    return gs.export_onnx(graph)


class _Feeds:
    """CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.items = iter(feeds)

    def get_next(self):
        return next(self.items, None)


def weight_matmuls(path: Path) -> list[str]:
    """The MatMul/Gemm nodes to quantize statically: those with a weight (initializer) as second input, except the
    lm_head (it writes the logits) and the MLP down projections (their input, act(gate) * up, carries the
    activation outliers that per-tensor int8 cannot hold)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}

    def gated(name: str) -> bool:   # act(gate) * up: a Mul fed by a weight matmul (RMSNorm's Mul is fed by none)
        node = producer.get(name)
        return node is not None and node.op_type == "Mul" and any(
            producer.get(i) is not None and producer[i].op_type in ("MatMul", "Gemm") for i in node.input)

    return [n.name for n in model.graph.node
            if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights and "logits" not in n.output
            and not gated(n.input[0])]


def quantize_int8_qdq(path: Path, calibration: list[dict[str, np.ndarray]]) -> list[str]:
    """Static Q/DQ int8 on the weight matmuls (weights per channel, activations per tensor, symmetric),
    calibrated on `calibration` feeds; attention's activation-by-activation matmuls stay in float."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    out = path.with_suffix(".qdq.onnx")
    logging.getLogger().setLevel(logging.ERROR)    # ORT's quantizer warns through the root logger
    quantize_static(str(path), str(out), _Feeds(calibration), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    nodes_to_quantize=weight_matmuls(path), calibrate_method=CalibrationMethod.MinMax,
                    use_external_data_format=True,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "CalibMovingAverage": True})
    return _replace(out, path)


def _replace(new: Path, path: Path) -> list[str]:
    """Move a quantizer's output (with whatever external data it wrote) over `path` as path + path.data."""
    import onnx

    model = onnx.load(str(new))              # pulls the external data into memory
    for p in list(new.parent.iterdir()):
        if p.name.startswith(new.stem):
            p.unlink()
    return save_onnx(model, path)


def lint(path: Path, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """`polygraphy check lint` with consistent input shapes; returns None when clean, else its report."""
    import subprocess
    import sys

    exe = shutil.which("polygraphy") or str(Path(sys.executable).with_name("polygraphy"))
    spec = [f"{name}:[{','.join(map(str, s))}]" for name, s in shapes.items()]
    cmd = [exe, "check", "lint", str(path)] + (["--input-shapes", *spec] if spec else [])
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    return None if proc.returncode == 0 else (proc.stdout + proc.stderr)[-2000:]
