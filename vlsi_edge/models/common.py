"""Host-side helpers the family adapters call (functions, not a base class): quiet imports, the no-video
processor shim, hook-based hidden-state capture, checkpoint loading.

The shim lives here and nowhere else: transformers' processors with a video slot cannot be built without
torchvision (STACK.md), so `without_video(cls)` returns a subclass that drops the slot and carries a stub with
`num_frames=None, fps=None` for chat templates that read them.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from vlsi_edge.errors import UserError

_NOISY = ("torchao", "Failed to load", "is an Enum subclass", "_C_mxfp8", "_C_cutlass")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in _NOISY)


@functools.lru_cache(maxsize=None)
def quiet_transformers() -> None:
    """Import transformers with torchao's harmless kernel-load warnings and progress bars filtered out."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("", "torchao", "torch.utils._pytree", "torch._dynamo"):
        logging.getLogger(name).addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message=".*torchao.*")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class _NoVideo:
    """Stands in for the video processor: the chat templates of some families read these two fields."""

    num_frames = None
    fps = None
    merge_size = 1


class _DropVideoSlot:
    """Sits between a processor class and ProcessorMixin in the MRO and swallows the video slot."""

    video_processor = _NoVideo()  # a class attribute: never serialised with the instance's fields

    def __init__(self, *args, **kwargs):
        from transformers.processing_utils import ProcessorMixin

        args = list(args)
        if len(args) >= 3:       # (image_processor, tokenizer, video_processor, ...)
            args.pop(2)
        kwargs.pop("video_processor", None)
        ProcessorMixin.__init__(self, *args, **kwargs)


@functools.lru_cache(maxsize=None)
def without_video(processor_cls: type) -> type:
    """`processor_cls` minus its video slot, so it builds and round-trips through save/from_pretrained.

    The subclass keeps the family's own `__init__` code (its named arguments, e.g. `image_seq_len`, are what
    `save_pretrained` writes and `from_pretrained` passes back, read from the code object), with every positional
    argument defaulted so `video_processor` may be left out; only the call into `ProcessorMixin.__init__` is
    intercepted, by placing `_DropVideoSlot` after the family class in the MRO.
    """
    import types

    from transformers.processing_utils import ProcessorMixin

    orig = processor_cls.__init__
    n_positional = orig.__code__.co_argcount - 1
    defaults = orig.__defaults__ or ()
    init = types.FunctionType(orig.__code__, orig.__globals__, orig.__name__,
                              (None,) * (n_positional - len(defaults)) + defaults, orig.__closure__)
    init.__kwdefaults__ = orig.__kwdefaults__
    interceptor = type("_DropVideoSlot", (_DropVideoSlot, ProcessorMixin), {})

    def get_attributes(cls):
        return [a for a in processor_cls.get_attributes() if a != "video_processor"]

    return type(processor_cls.__name__, (processor_cls, interceptor), {
        "get_attributes": classmethod(get_attributes), "__init__": init, "__module__": __name__,
    })


def hooked_hidden_states(forward, layers: nn.ModuleList, final_norm: nn.Module, wanted: list[int],
                         num_layers: int) -> tuple[dict[int, torch.Tensor], object]:
    """Run `forward()` and return `{k: hidden state after decoder layer k}` for the wanted layers only.

    Layer 0 is the decoder's input (embeddings after the image merge), layer k the output of decoder layer k,
    and layer `num_layers` the post-norm state, as HF's `hidden_states` tuple numbers them. Hooks, not
    `output_hidden_states`: only the requested tensors are kept alive.
    """
    bad = [k for k in wanted if not 0 <= k <= num_layers]
    if bad:
        raise ValueError(f"layers {bad} outside 0..{num_layers}")
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def first(x):
        return x[0] if isinstance(x, (tuple, list)) else x

    def grab(k):
        def hook(_module, _args, output):
            captured[k] = first(output)
        return hook

    try:
        for k in sorted(set(wanted)):
            if k == 0:
                def pre(_module, args, kwargs):
                    captured[0] = args[0] if args else kwargs["hidden_states"]
                handles.append(layers[0].register_forward_pre_hook(pre, with_kwargs=True))
            elif k == num_layers:
                handles.append(final_norm.register_forward_hook(grab(k)))
            else:
                handles.append(layers[k - 1].register_forward_hook(grab(k)))
        out = forward()
    finally:
        for h in handles:
            h.remove()
    return {k: captured[k] for k in wanted}, out


def default_target_layers(num_layers: int) -> list[int]:
    """METHOD.md's rule: every 4th layer from layer 2, excluding the last layer."""
    return [k for k in range(2, num_layers, 4) if k < num_layers]


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        from vlsi_edge.errors import ConfigError

        raise ConfigError(f"--dtype {dtype!r} is not one of {sorted(table)}")
    return table[dtype]


def read_config_dict(path: Path) -> dict:
    import json

    return json.loads((Path(path) / "config.json").read_text())


@contextlib.contextmanager
def seeded(seed: int):
    """Fixed-seed weight initialisation that leaves the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def square_image(image, size: int):
    """Resize a PIL image to the preset's fixed square (bicubic), as export fixes the grid."""
    from PIL import Image

    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BICUBIC)


def fixed_pixels(image_size: int) -> dict:
    """Qwen-VL image processor kwargs that resize every image to exactly one `image_size` square grid."""
    pixels = image_size * image_size
    return {"min_pixels": pixels, "max_pixels": pixels, "size": {"shortest_edge": pixels, "longest_edge": pixels}}


def resize_qwen_images(processor, image_size: int) -> None:
    """Make a Qwen2-VL / Qwen2.5-VL processor emit the grid of one `image_size` square (any multiple of patch ×
    merge = 28 px): their vision towers have no fixed position table, so a checkpoint can be trained and run at
    another resolution than it was made at (`vlsi-edge train --image-size`)."""
    from transformers.image_utils import SizeDict

    ip = processor.image_processor
    step = ip.patch_size * ip.merge_size
    if image_size < step or image_size % step:
        raise UserError(f"image size {image_size}: expected a positive multiple of {step} px (patch {ip.patch_size} "
                        f"x merge {ip.merge_size})", f"try --image-size {max(step, round(image_size / step) * step)}")
    pixels = image_size * image_size
    ip.size = SizeDict(shortest_edge=pixels, longest_edge=pixels)


def count_image_tokens(processor, image_size: int, image_token_id: int) -> int:
    """Image placeholder tokens the processor emits for one `image_size` square image."""
    from PIL import Image

    fmt_text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}],
        tokenize=False, add_generation_prompt=True)
    out = processor(images=[Image.new("RGB", (image_size, image_size), (127, 127, 127))], text=[fmt_text],
                    return_tensors="pt")
    return int((out["input_ids"] == image_token_id).sum())


def vlsi_meta(config) -> dict:
    """vlsi-edge's own fields stored in config.json (`vlsi_edge`: preset, target_layers, image_size)."""
    return dict(getattr(config, "vlsi_edge", None) or {})
