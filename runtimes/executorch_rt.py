"""ExecuTorch backend: the phone bundle's one `model.pte`, run through ExecuTorch's Python runtime (XNNPACK).

    rt = open_runtime("executorch", bundle="bundles/tiny-phone")
    rt.run("token_embedding", {"input_ids": ids})["inputs_embeds"]          # (1, T, D), as from the ONNX parts
    dec = rt.decoder(); dec.reset(); logits = dec(embeds, positions, image_mask)   # (T, V)

The program keeps its KV cache inside `text_decoder` (mutable buffers, `export/executorch_export.py`), so the
decoder session only tracks the cache position: each call sends `cache_position = arange(start, start + T)`.
`reset()` rewinds that position to 0 and nothing else: the program writes K/V at the positions it is given and
masks every slot past the query's position, so a sequence restarting at 0 never reads what an earlier one left
(and the Qwen2-VL position offset is reset inside by any call at position 0). Qwen2-VL's bundle carries three
extra embedding columns (is-image, row, column) for its 3-D positions, Gemma3's one (is-image, for bidirectional
attention inside an image); `run` strips them from the vision and embedding outputs and the session rebuilds
them from the positions and image mask the generation loop passes, so callers see the same [1,T,D] parts and
[3,1,T] positions as with ONNX.

Needs the `executorch` extra (its runtime loads torch's shared libraries, so this backend imports torch).
"""
from __future__ import annotations

import numpy as np
from vlsi_edge.runtimes.base import BackendMissing, Runtime, register
from vlsi_edge.runtimes.bundle import BundleError


def _installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("executorch")
    except PackageNotFoundError:
        return None


class ExecuTorchRuntime(Runtime):
    name = "executorch"

    def __init__(self, bundle, threads: int | None = None):
        super().__init__(bundle)
        installed = _installed_version()
        if installed is None:
            raise BackendMissing("backend executorch needs the executorch package, which is not installed",
                                 "pip install 'vlsi-edge[executorch]'")
        recorded = bundle.manifest.get("tools", {}).get("executorch")
        if recorded != installed:
            raise BundleError(f"bundle {bundle.root} was exported with executorch {recorded}, this machine has "
                              f"{installed}", f"re-export it here (`vlsi-edge export --target phone`) or install "
                              f"executorch=={recorded}")
        try:
            import executorch.kernels.quantized  # noqa: F401  (registers embedding_byte for int8 embeddings)
            import torch
            from executorch.extension.pybindings import portable_lib
            from executorch.runtime import Runtime as ETRuntime
        except ImportError as exc:
            raise BackendMissing(f"backend executorch cannot import its runtime ({exc})",
                                 "pip install 'vlsi-edge[executorch]'") from None
        self.torch = torch
        if threads:
            portable_lib._unsafe_reset_threadpool(int(threads))
        files = {part["file"] for part in bundle.parts.values()}
        if len(files) != 1:
            raise BundleError(f"bundle {bundle.root}: a phone bundle holds one .pte, the manifest lists "
                              f"{sorted(files)}", "re-export it with `vlsi-edge export --target phone`")
        self.program = ETRuntime.get().load_program(bundle.path(files.pop()))
        self.facts = bundle.manifest.get("decoder", {})
        self.extra = len(self.facts.get("extra_columns", []))
        missing = [p["method"] for p in bundle.parts.values() if p["method"] not in self.program.method_names]
        if missing:
            raise BundleError(f"bundle {bundle.root}: model.pte lacks method {missing[0]}", "re-export the bundle")

    def _execute(self, part: str, args: list[np.ndarray]) -> list[np.ndarray]:
        method = self.program.load_method(self.bundle.parts[part]["method"])
        outs = method.execute([self.torch.from_numpy(np.ascontiguousarray(a)) for a in args])
        return [o.numpy() for o in outs]

    def run(self, part, inputs):
        spec = self.bundle.parts[part]
        outs = self._execute(part, [inputs[name] for name in spec["inputs"]])
        if self.extra and part in ("vision_encoder", "token_embedding"):
            outs = [o[..., :-self.extra] for o in outs]
        return dict(zip(spec["outputs"], outs))

    def decoder(self):
        return InternalCache(self)


class InternalCache:
    """Decoder session for a program that holds its cache: tracks the cache position, adds the extra embedding
    columns the program reads (from the positions and `image_mask`, the image tokens of this call: Qwen2-VL's
    is_image/row/col, Gemma3's is_image), and checks that the positions asked for are the ones the program will
    use. One cache per runtime: opening a new
    session and calling it at position 0 takes the cache over."""

    def __init__(self, runtime: ExecuTorchRuntime):
        self.runtime = runtime
        self.max_seq_len = int(runtime.facts["max_seq_len"])
        mrope = runtime.facts.get("mrope")
        self.grid = tuple(mrope["grid"]) if mrope else None
        self.reset()

    def reset(self) -> None:
        self.length = 0
        self.offset = 0          # Qwen2-VL: cache position minus rotary position of the next text token

    def _columns(self, positions: np.ndarray, image_mask: np.ndarray | None) -> np.ndarray:
        """[3,1,T] rotary positions → the (is_image, row, col) columns [1,T,3] the program reads, checked against
        the rule it applies (text continues from the last position, images come as whole grids)."""
        t, h, w = (np.asarray(p[0], dtype=np.int64) for p in positions)
        n = len(t)
        flag = np.zeros(n, np.int64) if image_mask is None else np.asarray(image_mask, bool).reshape(-1).astype(int)
        r, c = (h - t) * flag, (w - t) * flag
        rows, cols = self.grid
        k = rows * cols
        j = r * cols + c
        grow = flag * (j == k - 1) * (k - max(rows, cols))
        delta = self.offset + np.cumsum(grow) - grow
        if not (np.array_equal(self.length + np.arange(n) - delta - j * flag, t) and np.array_equal(h - t, r)
                and np.array_equal(w - t, c)):
            raise ValueError("these 3-D positions are not the ones the program derives from its cache position "
                             "(expected text to continue from the last position and each image as a whole grid)")
        self.offset += int(grow.sum())
        return np.stack([flag, r, c], -1).astype(np.float32)[None]

    def __call__(self, embeds: np.ndarray, positions: np.ndarray, image_mask: np.ndarray | None = None) -> np.ndarray:
        n = embeds.shape[1]
        if self.length + n > self.max_seq_len:
            raise ValueError(f"{self.length + n} positions exceed the program's max_seq_len {self.max_seq_len}")
        cache_position = np.arange(self.length, self.length + n, dtype=np.int64)
        embeds = embeds.astype(np.float32, copy=False)
        if self.grid:
            embeds = np.concatenate([embeds, self._columns(np.asarray(positions), image_mask)], axis=-1)
        elif not np.array_equal(np.asarray(positions).reshape(-1), cache_position):
            raise ValueError(f"positions must continue the cache: expected {self.length}..{self.length + n - 1}")
        elif self.runtime.extra:       # is_image only (Gemma3's bidirectional attention inside an image)
            flag = np.zeros(n, np.float32) if image_mask is None else np.asarray(image_mask, np.float32).reshape(-1)
            embeds = np.concatenate([embeds, flag[None, :, None]], axis=-1)
        logits = self.runtime._execute("text_decoder", [embeds, cache_position])[0]
        self.length += n
        return logits[0]


register("executorch", ExecuTorchRuntime)
