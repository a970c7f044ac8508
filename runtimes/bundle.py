"""A bundle on disk: its manifest, checksums and side files, read and verified without torch.

Layout (DESIGN.md "Artefacts"):

    BUNDLE/
      manifest.json        format version, target, parts (file, precision, I/O), model facts, sha256 of every file
      vision_encoder.onnx  token_embedding.onnx  text_decoder.onnx   (+ external .data files)   |  model.pte
      tokenizer.json  preprocess.json  generation.json  parity.json
      cache/               engines and runtime caches built on the device (outside the checksummed set)

`open_bundle(path)` checks the format version, the schema, that every path stays inside the folder, and the sha256
of every listed file; it returns a `Bundle`. Export writes manifests with `write_manifest`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from vlsi_edge.errors import UserError

FORMAT = "vlsi-edge/bundle"
FORMAT_VERSION = 1
PART_NAMES = ("vision_encoder", "token_embedding", "text_decoder")
TARGETS = ("onnx", "jetson", "phone")
_REQUIRED = ("format", "format_version", "target", "parts", "model", "files", "tools")
CHECKSUM_EXEMPT = ("manifest.json", "cache/")


class BundleError(UserError):
    """A bundle that is missing, damaged, of another format version, or does not fit the request."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def inside(root: Path, rel: str) -> Path:
    """`root/rel`, refusing absolute paths and any `..` that leaves `root`."""
    path = (root / rel).resolve()
    if Path(rel).is_absolute() or not path.is_relative_to(root.resolve()):
        raise BundleError(f"bundle {root}: manifest path {rel!r} points outside the bundle folder",
                          "expected paths relative to the bundle; re-export it with `vlsi-edge export`")
    return path


def checksums(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` except the manifest itself and `cache/`."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not any(rel == e or rel.startswith(e) for e in CHECKSUM_EXEMPT):
            out[rel] = sha256_file(p)
    return out


def write_manifest(root: Path, manifest: dict) -> dict:
    """Fill in `files` (checksums of everything written so far) and write manifest.json."""
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": checksums(root)}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


@dataclass
class Bundle:
    root: Path
    manifest: dict

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def parts(self) -> dict:
        return self.manifest["parts"]

    def path(self, rel: str) -> Path:
        return inside(self.root, rel)

    def json(self, name: str) -> dict:
        return json.loads(self.path(name).read_text(encoding="utf-8"))

    @property
    def generation(self) -> dict:
        return self.json("generation.json")

    @property
    def preprocess(self) -> dict:
        return self.json("preprocess.json")


def read_manifest(root: Path) -> dict:
    path = root / "manifest.json"
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} does not exist", "expected the --out folder of `vlsi-edge export`")
    if not path.is_file():
        raise BundleError(f"{root} holds no manifest.json, so it is not a bundle",
                          "expected the --out folder of `vlsi-edge export`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc})", "re-export the bundle") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not a vlsi-edge bundle manifest", f"expected format {FORMAT!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(f"{path} has format version {version}, newer than this vlsi-edge reads ({FORMAT_VERSION})",
                          "upgrade vlsi-edge on this machine, or export with the version installed here")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise BundleError(f"{path} lacks {', '.join(missing)}", "re-export the bundle")
    if manifest["target"] not in TARGETS:
        raise BundleError(f"{path}: unknown target {manifest['target']!r}", f"expected one of {', '.join(TARGETS)}")
    return manifest


def open_bundle(root, verify: bool = True) -> Bundle:
    """Read and (by default) verify a bundle: schema, confinement of every path, sha256 of every file."""
    root = Path(root)
    manifest = read_manifest(root)
    for part in manifest["parts"].values():
        for rel in part.get("files", [part.get("file")]):
            inside(root, rel)
    if verify:
        verify_files(root, manifest)
    return Bundle(root, manifest)


def verify_files(root: Path, manifest: dict) -> None:
    listed = manifest["files"]
    for rel, digest in sorted(listed.items()):
        path = inside(root, rel)
        if not path.is_file():
            raise BundleError(f"bundle {root}: {rel} is missing", "re-export the bundle or copy it again whole")
        if sha256_file(path) != digest:
            raise BundleError(f"bundle {root}: {rel} was modified (sha256 differs from the manifest)",
                              "re-export the bundle or copy it again whole")
    extra = sorted(set(checksums(root)) - set(listed))
    if extra:
        raise BundleError(f"bundle {root}: {extra[0]} is not listed in the manifest",
                          "remove files added after export (device caches belong under cache/)")
