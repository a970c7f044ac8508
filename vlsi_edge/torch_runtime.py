"""The host-side PyTorch reference backend: a model folder (or builtin:NAME) run through the same split parts that
export traces, behind the same runtime interface and generation loop as the device backends.

    import vlsi_edge.torch_runtime                      # registers "torch"
    rt = open_runtime("torch", model="runs/tiny/student")

It lives on the host side (it needs the adapters); `vlsi_edge.runtimes` never imports it.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from vlsi_edge.runtimes.base import Runtime, register
from vlsi_edge.runtimes.bundle import Bundle


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, model: str, threads: int | None = None):
        import torch

        from vlsi_edge.export import parts as PARTS
        from vlsi_edge.models import load_model

        if threads:
            torch.set_num_threads(threads)
        self.vlm = load_model(model)
        self.parts_ = PARTS.split_model(self.vlm)
        facts = PARTS.model_facts(self.vlm, self.parts_["vision_encoder"].meta["n_image_tokens"])
        self._tmp = tempfile.TemporaryDirectory(prefix="vlsi-edge-torch-")
        root = Path(self._tmp.name)
        self.vlm.tokenizer.backend_tokenizer.save(str(root / "tokenizer.json"))
        (root / "generation.json").write_text(json.dumps(PARTS.generation_config(self.vlm)))
        manifest = {"target": "host", "model": facts, "source": {"model": str(model), "family": self.vlm.family},
                    "parts": {name: {"precision": "fp32", "inputs": p.input_names, "outputs": p.output_names}
                              for name, p in self.parts_.items()}}
        super().__init__(Bundle(root, manifest))

    def run(self, part, inputs):
        import torch

        p = self.parts_[part]
        if part == "text_decoder":
            names = p.input_names
            fixed = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in names if not n.startswith("past")]
            past = tuple(torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in names if n.startswith("past"))
            args = (*fixed, past)
        else:
            args = tuple(torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in p.input_names)
        with torch.no_grad():
            out = p.module(*args)
        out = out if isinstance(out, tuple) else (out,)
        return {name: t.float().numpy() if t.is_floating_point() else t.numpy()
                for name, t in zip(p.output_names, out)}


register("torch", TorchRuntime)
