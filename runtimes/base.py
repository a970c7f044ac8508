"""One small runtime interface and its registry.

A runtime opens a verified bundle (or, for the host-side PyTorch reference, a model folder), lists its parts and
runs one part on named numpy inputs. `decoder()` hands the generation loop a session that owns the KV cache.

    rt = open_runtime("ort", bundle="out/bundle")          # or "executorch", "tensorrt", "torch" (host)
    rt.parts                                              # ("vision_encoder", "token_embedding", "text_decoder")
    rt.run("token_embedding", {"input_ids": ids})         # {"inputs_embeds": ...}

Backends register a factory under a name; importing the backend's library happens inside the factory, so a
missing library is one clear error naming the extra to install.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from vlsi_edge.runtimes.bundle import Bundle, BundleError, open_bundle
from vlsi_edge.runtimes.text import Prompter

from vlsi_edge.errors import UserError

_REGISTRY: dict[str, Callable[..., Runtime]] = {}
# which targets each backend can run
BACKEND_TARGETS = {"ort": ("onnx", "jetson"), "tensorrt": ("jetson",), "executorch": ("phone",), "torch": ()}
EXTRAS = {"ort": "onnx", "executorch": "executorch", "tensorrt": "TensorRT (JetPack on a Jetson)", "torch": "host"}


class BackendMissing(UserError):
    pass


def register(name: str, factory: Callable[..., Runtime]) -> None:
    _REGISTRY[name] = factory


def backends() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    """Import the bundled backends so they register; each imports its own library only when opened."""
    import importlib

    for module in ("ort", "executorch_rt", "tensorrt_rt"):
        try:
            importlib.import_module(f"vlsi_edge.runtimes.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"vlsi_edge.runtimes.{module}":
                raise


class Runtime:
    """Base class: holds the bundle and its prompter; subclasses implement `run` (and may override `decoder`)."""

    name = "?"
    cache_dtype = np.float32

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.prompter = Prompter(bundle.path("tokenizer.json"), bundle.generation)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.bundle.parts)

    def run(self, part: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decoder(self):
        from vlsi_edge.runtimes.generate import ExplicitCache

        return ExplicitCache(self, self.bundle.model, self.cache_dtype)


def open_runtime(backend: str, bundle=None, verify: bool = True, **options) -> Runtime:
    """Open `bundle` (a path or Bundle) with the named backend, refusing a backend that cannot run its target."""
    _load_builtin()
    if backend not in BACKEND_TARGETS:
        raise UserError(f"unknown backend {backend!r}", f"expected one of {', '.join(BACKEND_TARGETS)}")
    if backend == "torch":
        return _factory(backend)(**options)
    b = bundle if isinstance(bundle, Bundle) else open_bundle(bundle, verify=verify)
    if b.target not in BACKEND_TARGETS[backend]:
        raise BundleError(f"backend {backend} cannot run a {b.target} bundle",
                          f"expected a {' or '.join(BACKEND_TARGETS[backend])} bundle for {backend}, or "
                          f"--backend {'executorch' if b.target == 'phone' else 'ort'}")
    return _factory(backend)(b, **options)


def _factory(backend: str):
    if backend not in _REGISTRY:
        raise BackendMissing(f"backend {backend} is not available in this installation",
                             f"install {EXTRAS[backend]}")
    return _REGISTRY[backend]
