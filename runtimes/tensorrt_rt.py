"""TensorRT backend: the bundle's native engines from `<bundle>/cache/`, run through polygraphy's TensorRT runner
(numpy in, numpy out; no torch).

Engines only run on the GPU model and TensorRT version that built them, so each engine's record (written by
`vlsi-edge export --build-engines`, or `cache/built_by.json` / `cache/tensorrt_version.txt` from
build_engines.sh on the Jetson) is compared with the TensorRT imported here; a mismatch is refused with a message
saying how to rebuild. TensorRT is imported lazily: on machines without it (every machine this project is
developed on) the backend reports itself missing, and its tests skip with that reason.
"""
from __future__ import annotations

import json

from vlsi_edge.runtimes.base import BackendMissing, Runtime, register
from vlsi_edge.runtimes.bundle import BundleError

PARTS = ("vision_encoder", "token_embedding", "text_decoder")


def _engine_records(bundle) -> dict:
    records = dict(bundle.manifest.get("tensorrt", {}).get("engines", {}))
    built_by = bundle.root / "cache" / "built_by.json"
    if built_by.is_file():
        records.update(json.loads(built_by.read_text()))
    version_txt = bundle.root / "cache" / "tensorrt_version.txt"
    for name in PARTS:
        records.setdefault(name, {"file": f"cache/{name}.engine"})
        if "tensorrt" not in records[name] and version_txt.is_file():
            text = version_txt.read_text()
            records[name]["tensorrt"] = next((w.strip("v[]") for w in text.split() if w[:1].isdigit()
                                              or w.startswith("v")), None)
    return records


class TensorRTRuntime(Runtime):
    name = "tensorrt"

    def __init__(self, bundle):
        super().__init__(bundle)
        try:
            import tensorrt as trt
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        except Exception as exc:  # ImportError, or PyPI's placeholder wheel failing to find its libraries
            raise BackendMissing(f"backend tensorrt needs TensorRT, which is not usable here ({type(exc).__name__})",
                                 "on a Jetson it comes with JetPack; or use --backend ort with the "
                                 "TensorRT execution provider") from None
        self.runners = {}
        for name, record in _engine_records(bundle).items():
            path = bundle.path(record["file"])
            if not path.is_file():
                raise BundleError(f"bundle {bundle.root} has no TensorRT engine {record['file']}",
                                  "build it on this device: sh build_engines.sh (in the bundle folder)")
            built = record.get("tensorrt")
            if built and built.split(".")[:2] != trt.__version__.split(".")[:2]:
                raise BundleError(f"{record['file']} was built with TensorRT {built}, this device has "
                                  f"{trt.__version__}", "rebuild the engines here: sh build_engines.sh")
            runner = TrtRunner(EngineFromBytes(path.read_bytes()))
            runner.activate()
            self.runners[name] = runner

    def run(self, part, inputs):
        return {k: v.copy() for k, v in self.runners[part].infer(feed_dict=inputs).items()}

    def close(self) -> None:
        for runner in self.runners.values():
            runner.deactivate()


register("tensorrt", TensorRTRuntime)
