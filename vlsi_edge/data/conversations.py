"""LLaVA-style conversation datasets: read, check and open them (numpy + Pillow + stdlib; runs on the device).

    vlsi-edge bench --bundle B --backend ort --data builtin:shapes --split test
    vlsi-edge train --model M --data path/to/folder            # folder with train.json(l), val.json(l), ...

A record is `{"id": str|int, "image": "relative/path.png" (optional), "conversations": [{"from": "human",
"value": "<image>\\nWhat colour ...?"}, {"from": "gpt", "value": "red"}, ...], ...extra keys}`. Roles human/user,
gpt/assistant and system map to "user", "assistant" and "system"; the `<image>` placeholder is stripped from the
text and only decides whether the image goes before the first user text (`Sample.image_first`). Extra keys such as
`category`, `choices` and `image_id` land in `Sample.meta`.

`.jsonl` files are streamed line by line; `.json` files (a list) are decoded record by record so every error can
name its line. Every problem is a one-line DataError "file:LINE: what — expected"; with `skip_bad` the sample is
dropped and counted by reason instead. Image files are checked for existence here and decoded only by
`Dataset.validate`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vlsi_edge.data.images import check_image, resolve_image_path
from vlsi_edge.errors import DataError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_TOKEN = "<image>"
SPLIT_NAMES = ("train", "val", "test", "pretrain")
BUILTINS = ("shapes",)
_RECORD_SHAPE = 'expected {"id": ..., "image": "rel/path.png", "conversations": [{"from": "human", "value": ...}, ...]}'


@dataclass(frozen=True)
class Turn:
    role: str
    text: str


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path | None
    turns: tuple[Turn, ...]
    meta: dict = field(default_factory=dict, hash=False)
    image_first: bool = True

    def _last(self, role: str) -> str:
        for turn in reversed(self.turns):
            if turn.role == role:
                return turn.text
        return ""

    @property
    def answer(self) -> str:
        return self._last("assistant")

    @property
    def question(self) -> str:
        return self._last("user")

    @property
    def category(self) -> str:
        return str(self.meta.get("category", "all"))

    @property
    def cluster(self) -> str:
        if self.meta.get("image_id") is not None:
            return str(self.meta["image_id"])
        return str(self.image) if self.image is not None else self.id


class _Bad(Exception):
    def __init__(self, reason: str, what: str, expected: str):
        super().__init__(what)
        self.reason, self.what, self.expected = reason, what, expected


def _turns(conversations, has_image: bool) -> tuple[tuple[Turn, ...], bool]:
    turns, image_first, seen_user = [], True, False
    for k, turn in enumerate(conversations, start=1):
        if not isinstance(turn, dict):
            raise _Bad("bad_turn", f"turn {k} is a {type(turn).__name__}, not an object",
                        'expected {"from": "human"|"gpt"|"system", "value": "..."}')
        raw_role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if not isinstance(raw_role, str) or raw_role.strip().lower() not in ROLES:
            raise _Bad("unknown_role", f"unknown role {raw_role!r} in turn {k}",
                       "expected one of human/user, gpt/assistant, system")
        if not isinstance(text, str):
            raise _Bad("bad_turn", f"turn {k} has no text value (got {type(text).__name__})",
                       'expected a string "value"')
        role = ROLES[raw_role.strip().lower()]
        if role == "user" and not seen_user:
            seen_user = True
            pos = text.find(IMAGE_TOKEN)
            image_first = pos < 0 or not text[:pos].strip()
        turns.append(Turn(role, re.sub(r"[ \t]{2,}", " ", text.replace(IMAGE_TOKEN, "")).strip()))
    if not any(t.role == "assistant" for t in turns):
        raise _Bad("no_answer", "sample has no assistant turn", "expected at least one gpt/assistant turn")
    for k, t in enumerate(turns, start=1):
        if t.role == "assistant" and not t.text:
            raise _Bad("empty_answer", f"assistant turn {k} is empty", "expected a non-empty answer text")
    return tuple(turns), image_first if has_image else True


def _to_sample(obj, path: Path, line: int, root: Path) -> Sample:
    if not isinstance(obj, dict):
        raise _Bad("not_object", f"record is a {type(obj).__name__}, not an object", _RECORD_SHAPE)
    raw_id = obj.get("id")
    if raw_id is None:
        sample_id = f"{path.name}:{line}"
    elif isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or str(raw_id) == "":
        raise _Bad("bad_id", f"id {raw_id!r} is not a non-empty string or integer", "expected a string or integer id")
    else:
        sample_id = str(raw_id)
    conversations = obj.get("conversations")
    if conversations is None:
        raise _Bad("no_conversations", "record has no 'conversations'", _RECORD_SHAPE)
    if not isinstance(conversations, list) or not conversations:
        raise _Bad("no_conversations", f"'conversations' is {'empty' if conversations == [] else 'not a list'}",
                   "expected a non-empty list of {from, value} turns")
    raw_image = obj.get("image")
    if raw_image is not None and not isinstance(raw_image, str):
        raise _Bad("bad_image_field", f"'image' is a {type(raw_image).__name__}",
                   "expected one relative image path (multi-image records are not supported)")
    turns, image_first = _turns(conversations, raw_image is not None)
    image = None
    if raw_image is not None:
        try:
            image = resolve_image_path(raw_image, root)
        except DataError as exc:
            raise _Bad("image_escapes_root", str(exc), "") from exc
        if not image.is_file():
            raise _Bad("missing_image", f"image not found: {image}", f"expected the file below the image root {root}")
    meta = {k: v for k, v in obj.items() if k not in ("id", "image", "conversations")}
    return Sample(sample_id, image, turns, meta, image_first)


def _jsonl_records(path: Path):
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                yield line_no, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield line_no, _Bad("malformed_json", f"not UTF-8 text ({exc.reason})", "expected UTF-8 JSON")
            except json.JSONDecodeError as exc:
                yield line_no, _Bad("malformed_json", f"malformed JSON ({exc.msg} at column {exc.colno})",
                                    "expected one JSON object per line")


def _json_records(path: Path):
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})", "expected a UTF-8 JSON list of records") from exc
    decoder, ws = json.JSONDecoder(), " \t\n\r"

    def skip(i: int) -> int:
        while i < len(text) and text[i] in ws:
            i += 1
        return i

    def line_of(i: int) -> int:
        return text.count("\n", 0, i) + 1

    i = skip(0)
    if i >= len(text) or text[i] != "[":
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})",
                            "expected a JSON list of records") from exc
        raise DataError(f"{path}:{line_of(i)}: top level is not a list", "expected a JSON list of records")
    i, line, pos = skip(i + 1), 1, 0
    if i < len(text) and text[i] == "]":
        return
    while True:
        line, pos = line + text.count("\n", pos, i), i
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})",
                            "expected a JSON list of records") from exc
        yield line, obj
        i = skip(end)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
            continue
        if i < len(text) and text[i] == "]":
            if skip(i + 1) < len(text):
                raise DataError(f"{path}:{line_of(skip(i + 1))}: extra data after the list",
                                "expected a single JSON list")
            return
        raise DataError(f"{path}:{line_of(i)}: malformed JSON (expected ',' or ']' after a record)",
                        "expected a JSON list of records")


def iter_samples(path: Path, image_root: Path | None = None, skip_bad: bool = False,
                 skipped: Counter | None = None) -> Iterator[tuple[int, Sample]]:
    """Like `read_conversations`, but yields (line number, Sample)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}", "expected an existing .json or .jsonl file")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise DataError(f"dataset file {path} has suffix {suffix or '(none)'!r}", "expected .json or .jsonl")
    root = Path(image_root) if image_root is not None else path.parent
    records = _jsonl_records(path) if suffix == ".jsonl" else _json_records(path)
    seen: dict[str, int] = {}
    for line, obj in records:
        try:
            if isinstance(obj, _Bad):
                raise obj
            sample = _to_sample(obj, path, line, root)
            if sample.id in seen:
                raise _Bad("duplicate_id", f"duplicate id {sample.id!r} (first seen at line {seen[sample.id]})",
                           "expected ids unique within a file")
        except _Bad as bad:
            if not skip_bad:
                raise DataError(f"{path}:{line}: {bad.what}", bad.expected or None) from None
            if skipped is not None:
                skipped[bad.reason] += 1
            continue
        seen[sample.id] = line
        yield line, sample


def read_conversations(path: Path, image_root: Path | None = None, skip_bad: bool = False,
                       skipped: Counter | None = None) -> Iterator[Sample]:
    """Stream the Samples of one .json/.jsonl file (image paths relative to `image_root`, default its folder)."""
    for _, sample in iter_samples(path, image_root, skip_bad, skipped):
        yield sample


class Dataset:
    """One split of a conversation dataset: re-iterable, streamed from its file(s), optionally validated."""

    def __init__(self, name: str, files, split: str | None = None, image_root: str | Path | None = None,
                 skip_bad: bool = False):
        self.name = name
        self.split = split
        self.files = tuple(Path(f) for f in files)
        self.image_root = Path(image_root) if image_root is not None else None
        self.skip_bad = skip_bad
        self._excluded: set[str] = set()
        self._read_skipped: Counter = Counter()
        self._image_skipped: Counter = Counter()
        self._len: int | None = None

    def __repr__(self) -> str:
        return f"Dataset(name={self.name!r}, split={self.split!r}, files={[str(f) for f in self.files]})"

    @property
    def skipped(self) -> Counter:
        """Reasons and counts of the samples dropped by the last full pass (and by `validate`'s image checks)."""
        return self._read_skipped + self._image_skipped

    def _samples(self, counter: Counter) -> Iterator[tuple[Path, int, Sample]]:
        for f in self.files:
            for line, sample in iter_samples(f, self.image_root, self.skip_bad, counter):
                yield f, line, sample

    def __iter__(self) -> Iterator[Sample]:
        counter: Counter = Counter()
        for _, _, sample in self._samples(counter):
            if sample.id not in self._excluded:
                yield sample
        self._read_skipped = counter

    def __len__(self) -> int:
        if self._len is None:
            self._len = sum(1 for _ in self)
        return self._len

    def validate(self, check_images: bool = True) -> None:
        """Read every record; with `check_images`, decode-check each distinct image once. Raises the first
        DataError, or with `skip_bad` drops the bad samples from later iteration and counts them in `skipped`."""
        counter: Counter = Counter()
        image_skipped: Counter = Counter()
        verdicts: dict[Path, DataError | None] = {}
        for f, line, sample in self._samples(counter):
            if not check_images or sample.image is None:
                continue
            if sample.image not in verdicts:
                try:
                    check_image(sample.image)
                    verdicts[sample.image] = None
                except DataError as exc:
                    verdicts[sample.image] = exc
            error = verdicts[sample.image]
            if error is not None:
                if not self.skip_bad:
                    raise DataError(f"{f}:{line}: sample {sample.id!r}: {error}") from error
                self._excluded.add(sample.id)
                image_skipped["bad_image"] += 1
        self._read_skipped, self._image_skipped, self._len = counter, image_skipped, None


def cache_root() -> Path:
    """`$VLSI_EDGE_CACHE`, default ~/.cache/vlsi_edge."""
    env = os.environ.get("VLSI_EDGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vlsi_edge"


def _builtin_folder(spec: str) -> Path:
    body = spec[len("builtin:"):]
    name, _, arg_text = body.partition(":")
    if name not in BUILTINS:
        raise DataError(f"unknown builtin dataset {name!r} in {spec!r}",
                        f"expected one of: {', '.join('builtin:' + b for b in BUILTINS)}")
    from vlsi_edge.data import shapes

    params: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in arg_text.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise DataError(f"bad builtin parameter {item!r} in {spec!r}", "expected key=value, e.g. seed=1")
        try:
            params[key.strip()] = int(value.strip())
        except ValueError:
            raise DataError(f"builtin parameter {key.strip()}={value.strip()!r} in {spec!r} is not an integer",
                            "expected an integer value") from None
    params = shapes.validate_params(**params)
    # options at their off value are left out of the hash, so caches made before they existed stay valid
    hashed = {k: v for k, v in params.items() if not (k in ("captions", "n_curriculum", "scene_targets") and v == 0)}
    if params["n_curriculum"]:      # a folder made with fewer warm-up splits is not reused
        hashed["curriculum_splits"] = list(shapes.CURRICULUM_SPLITS)
    digest = hashlib.sha256(json.dumps({"params": hashed, "version": shapes.GENERATOR_VERSION},
                                       sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_root() / "data" / f"shapes-{digest}"
    if not (folder / "info.json").is_file():
        try:
            shapes.synth(folder, **params)
        except DataError:
            if not (folder / "info.json").is_file():
                raise DataError(f"cache folder {folder} exists but holds no finished builtin:shapes data",
                                "expected it to be complete; delete it and retry") from None
    return folder


def _split_files(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in (".json", ".jsonl") and p.stem != "info" and not p.name.startswith("."):
            found.setdefault(p.stem, []).append(p)
    return found


def _open_folder(folder: Path, split, image_root, skip_bad, name: str) -> Dataset:
    found = _split_files(folder)
    if not found:
        raise DataError(f"no split files in dataset folder {folder}",
                        f"expected files named <split>.json or <split>.jsonl, e.g. {', '.join(SPLIT_NAMES)}")
    if split is None:
        if len(found) > 1:
            raise DataError(f"dataset folder {folder} holds several splits ({', '.join(found)}) and no split was given",
                            "expected a split, e.g. --split test")
        split = next(iter(found))
    parts = split.split("+")    # "pairs+pretrain": the union of several splits, shuffled together by the trainer
    if len(set(parts)) != len(parts) or not all(parts):
        raise DataError(f"split {split!r} names an empty or repeated split",
                        "expected split names joined by '+', each once, e.g. --split pairs+pretrain")
    files = []
    for part in parts:
        if part not in found:
            raise DataError(f"split {part!r} not found in dataset folder {folder}",
                            f"expected one of the splits present: {', '.join(found)}")
        if len(found[part]) > 1:
            raise DataError(f"split {part!r} in {folder} has both {found[part][0].name} and {found[part][1].name}",
                            "expected exactly one file per split")
        files += found[part]
    return Dataset(name, files, split, image_root if image_root is not None else folder, skip_bad)


def open_dataset(spec: str, split: str | None = None, image_root: str | Path | None = None,
                 skip_bad: bool = False) -> Dataset:
    """Open `builtin:NAME[:k=v,...]`, a .json/.jsonl file, or a folder of `<split>.json(l)` files."""
    spec = str(spec)
    if spec.startswith("builtin:"):
        return _open_folder(_builtin_folder(spec), split, image_root, skip_bad, name=spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"dataset not found: {spec}",
                        "expected builtin:NAME, a .json/.jsonl file, or a folder holding train/val/test files")
    if path.is_dir():
        return _open_folder(path, split, image_root, skip_bad, name=path.name)
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise DataError(f"dataset file {path} has suffix {path.suffix or '(none)'!r}", "expected .json or .jsonl")
    if split is not None and path.stem in SPLIT_NAMES and path.stem != split:
        raise DataError(f"dataset file {path} is the {path.stem!r} split but split {split!r} was asked for",
                        f"expected --split {path.stem} or the {split}.json(l) file")
    split = split or (path.stem if path.stem in SPLIT_NAMES else None)
    return Dataset(path.name, [path], split, image_root if image_root is not None else path.parent, skip_bad)
