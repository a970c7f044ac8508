"""ONNX Runtime backend: one InferenceSession per part; providers from the manifest (or the caller).

The manifest's `runtime.ort.providers` lists what the exporter recommends for the target, e.g. for `jetson`:
TensorRT EP (fp16, engine cache under <bundle>/cache/) → CUDA → CPU. Providers this onnxruntime build lacks are
skipped, so the same bundle runs on a laptop's CPU build and on a Jetson's onnxruntime-gpu.
"""
from __future__ import annotations

from vlsi_edge.runtimes.base import BackendMissing, Runtime, register


def _providers(bundle, requested):
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    wanted = requested or bundle.manifest.get("runtime", {}).get("ort", {}).get("providers") or ["CPUExecutionProvider"]
    out = []
    for p in wanted:
        name, opts = (p, {}) if isinstance(p, str) else (p[0], dict(p[1]))
        if name not in available:
            continue
        if name == "TensorrtExecutionProvider":
            cache = bundle.root / "cache" / "ort-trt"
            cache.mkdir(parents=True, exist_ok=True)
            opts.setdefault("trt_engine_cache_path", str(cache))
            opts.setdefault("trt_timing_cache_path", str(cache))
        out.append((name, opts) if opts else name)
    return out or ["CPUExecutionProvider"]


class OrtRuntime(Runtime):
    name = "ort"

    def __init__(self, bundle, providers=None, threads: int | None = None):
        super().__init__(bundle)
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendMissing("backend ort needs onnxruntime, which is not installed",
                                 "pip install 'vlsi-edge[onnx]' (on a Jetson: NVIDIA's onnxruntime-gpu wheel)") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.providers = _providers(bundle, providers)
        self.sessions = {name: ort.InferenceSession(str(bundle.path(part["file"])), options, providers=self.providers)
                         for name, part in bundle.parts.items()}
        self.output_names = {n: [o.name for o in s.get_outputs()] for n, s in self.sessions.items()}

    def run(self, part, inputs):
        session = self.sessions[part]
        return dict(zip(self.output_names[part], session.run(None, inputs)))


register("ort", OrtRuntime)
