"""The vision_encoder part: on the device's uint8 image it gives exactly the features the model places at its
image-token positions on the host path, the device preprocessing equals the host's, and it exports (strict
torch.export; ONNX run by onnxruntime) with the same output."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from PIL import Image, ImageDraw
from vlsi_edge.export.vision import build_vision_encoder
from vlsi_edge.runtimes import preprocess

from vlsi_edge.data.collate import Collator
from vlsi_edge.data.conversations import Sample, Turn
from vlsi_edge.data.images import load_image as host_load_image
from vlsi_edge.data.shapes import draw_shape
from vlsi_edge.models import load_model
from vlsi_edge.models.common import square_image
from vlsi_edge.models.presets import FAMILY_NAMES

FAST = ("qwen2vl", "llava_onevision")
PRESETS = [pytest.param(f"tiny-{f}-student", marks=() if f in FAST else pytest.mark.matrix, id=f)
           for f in FAMILY_NAMES] + [pytest.param("tiny-qwen2vl-teacher", id="qwen2vl-teacher")]


def _load(preset: str):
    """The preset with every non-text parameter nudged by seeded noise: HF's init leaves the biases, InternVL's CLS
    and position embeddings and Gemma3's projection (so every Gemma3 image feature) at zero, which would make parts
    of the comparison vacuous."""
    vlm = load_model(f"builtin:{preset}")
    text = {id(p) for p in vlm.language_model.parameters()}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in vlm.model.model.parameters():
            if id(p) not in text:
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return vlm


def _picture(path, size, mode, shape, rgb):
    """A shape on a light background, saved in `mode` (transparent corners for the alpha modes)."""
    im = Image.new("RGBA", size, (250, 240, 230, 255))
    draw = ImageDraw.Draw(im)
    draw_shape(draw, shape, 6, 5, min(size) - 12, rgb + (255,))
    draw.rectangle((0, 0, 9, 9), fill=(0, 0, 0, 0))
    im.convert(mode).save(path)
    return path


@pytest.fixture
def pictures(tmp_path):
    """Three distinct images: square RGB at the model size, non-square RGBA, small palette (upscaled)."""
    return [_picture(tmp_path / "square.png", (112, 112), "RGB", "circle", (200, 30, 30)),
            _picture(tmp_path / "wide.png", (150, 90), "RGBA", "triangle", (20, 30, 200)),
            _picture(tmp_path / "small.png", (64, 64), "P", "cross", (20, 180, 30))]


def _reference(vlm, path) -> torch.Tensor:
    """What the model writes at its image-token positions for `path` via the training/eval collator: `(N, D)`."""
    sample = Sample(id="x", image=path, turns=(Turn("user", "What is in the picture?"),), meta={})
    batch = Collator(vlm, mode="generate")([sample])
    with torch.no_grad():
        embeds = vlm.hidden_states(batch, [0])[0]     # decoder input, image features merged
    return embeds[batch["input_ids"] == vlm.model.config.image_token_id]


def _device_input(path, size) -> torch.Tensor:
    return torch.from_numpy(preprocess.load_image(path, size))[None]


def _random_image(size, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", PRESETS)
def test_eager_equals_model_image_features(preset, pictures, torch_threads):
    """Eager output on the device input equals the model's own image features (≤1e-5), per image, and differs
    between images; meta describes the part."""
    vlm = _load(preset)
    module, meta = build_vision_encoder(vlm)
    size, n = vlm.image_size, vlm.image_token_count()
    assert json.loads(json.dumps(meta)) == meta
    assert meta["input"] == {"name": "image", "dtype": "uint8", "shape": [1, 3, size, size], "layout": "NCHW"}
    assert meta["output"]["shape"] == [1, n, vlm.hidden_size] and meta["n_image_tokens"] == n
    outs = []
    for path in pictures:
        with torch.no_grad():
            out = module(_device_input(path, size))
        assert out.dtype == torch.float32 and list(out.shape) == meta["output"]["shape"]
        ref = _reference(vlm, path)
        assert (out[0] - ref).abs().max().item() <= 1e-5, path.name
        outs.append(out)
    assert all((a - b).abs().max().item() > 1e-3 for i, a in enumerate(outs) for b in outs[i + 1:])


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P", "L", "CMYK", "I;16"])
def test_preprocess_equals_host_image(mode, tmp_path):
    """`preprocess.load_image` equals the host's loaded, squared image byte for byte, from a path or a PIL image."""
    path = _picture(tmp_path / f"im.{'tiff' if mode == 'CMYK' else 'png'}", (70, 50), mode, "square", (90, 140, 10))
    host = np.asarray(square_image(host_load_image(path), 112)).transpose(2, 0, 1)
    got = preprocess.load_image(path, 112)
    assert got.dtype == np.uint8 and got.shape == (3, 112, 112) and got.flags.c_contiguous
    assert np.array_equal(got, host)
    with Image.open(path) as im:
        assert np.array_equal(preprocess.load_image(im, 112), host)


def test_preprocess_applies_exif_orientation(tmp_path):
    """An EXIF-rotated file is turned upright as on the host (here a 90° turn makes 40×60 into 60×40)."""
    path = tmp_path / "rotated.png"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 60), (10, 20, 30)).save(path, exif=exif)
    host = host_load_image(path)
    assert host.size == (60, 40)
    assert np.array_equal(preprocess.load_image(path, 56), np.asarray(square_image(host, 56)).transpose(2, 0, 1))


def test_preprocess_imports_without_torch():
    """The device side needs only numpy and Pillow."""
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in {'torch', 'transformers'}: raise ImportError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from vlsi_edge.runtimes.preprocess import load_image\n"
            "from PIL import Image\n"
            "print(load_image(Image.new('L', (5, 3), 7), 4).shape)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "(3, 4, 4)", r.stderr


@pytest.mark.parametrize("preset", PRESETS)
def test_strict_export_equals_eager(preset, torch_threads):
    """`torch.export.export(strict=True)` traces the part and the exported program gives the eager output."""
    module, meta = build_vision_encoder(_load(preset))
    x = _random_image(meta["image_size"])
    program = torch.export.export(module, (x,), strict=True)
    with torch.no_grad():
        assert (program.module()(x) - module(x)).abs().max().item() <= 1e-6


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # inside torch's ONNX exporter
@pytest.mark.parametrize("preset", PRESETS)
def test_onnx_runs_in_onnxruntime(preset, tmp_path, torch_threads):
    """The dynamo ONNX export (opset 18) takes a uint8 `image`, and onnxruntime's output matches eager ≤1e-4."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    module, meta = build_vision_encoder(_load(preset))
    x = _random_image(meta["image_size"], seed=1)
    path = tmp_path / "vision_encoder.onnx"
    assert meta["onnx_export"] == {"dynamo": True, "opset_version": 18}
    torch.onnx.export(module, (x,), path, **meta["onnx_export"],
                      input_names=[meta["input"]["name"]], output_names=[meta["output"]["name"]])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape) == ("image", "tensor(uint8)", meta["input"]["shape"])
    got = session.run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        want = module(x).numpy()
    assert outp.name == "image_embeds" and list(got.shape) == meta["output"]["shape"]
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.matrix
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
def test_qwen2_5vl_window_attention(pictures, tmp_path, torch_threads):
    """With real windows (56-px windows, block 0 windowed) the precomputed order and mask match the model, and the
    part still exports (strict torch.export, ONNX)."""
    ort = pytest.importorskip("onnxruntime")
    vlm = _load("tiny-qwen2_5vl-student")
    visual = vlm.model.model.visual
    visual.window_size, visual.fullatt_block_indexes = 56, [1]   # read by the HF forward on every call
    module, meta = build_vision_encoder(vlm)
    assert any("block mask" in note for note in meta["notes"])
    x = _device_input(pictures[1], vlm.image_size)
    with torch.no_grad():
        out = module(x)
    assert (out[0] - _reference(vlm, pictures[1])).abs().max().item() <= 1e-5
    program = torch.export.export(module, (x,), strict=True)
    assert (program.module()(x) - out).abs().max().item() <= 1e-6
    torch.onnx.export(module, (x,), tmp_path / "v.onnx", **meta["onnx_export"], input_names=["image"])
    session = ort.InferenceSession(str(tmp_path / "v.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"image": x.numpy()})[0] - out.numpy()).max() <= 1e-4
