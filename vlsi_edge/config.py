"""Typed run configuration: nested dataclasses with defaults that give a working tiny run, validated on
construction (every problem reported at once), saved and loaded as YAML presets.

    cfg = DistillConfig.from_yaml("vlsi_edge/recipes/tiny-qwen2vl.yaml", overrides={"train.batch_size": 8})
    cfg.to_yaml(run / "config.yaml")

METHOD.md names every switch; each ambiguity of the paper is a field here with the default METHOD.md chooses.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vlsi_edge.errors import ConfigError


def load_yaml(text: str):
    """`yaml.safe_load`, but "1e-5" is a float as YAML 1.2 reads it (PyYAML follows YAML 1.1, where a float needs a
    dot, so `--set optim.lr=1e-5` would arrive as the string '1e-5')."""
    import yaml

    return yaml.load(text, Loader=_yaml_loader())


@functools.cache
def _yaml_loader():
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return Loader


STAGES = ("verbalize", "interact", "sft")
DEFAULT_STEPS = {"verbalize": 100, "interact": 200, "sft": 100, "kd": 200}


@dataclass
class OptimConfig:
    lr: float = 1e-3                 # peak learning rate (AdamW); restarted per stage (paper)
    min_lr_ratio: float = 0.01       # cosine floor as a fraction of lr (paper: 1e-4 -> 1e-6)
    warmup_steps: int = 10
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    clip: float = 1.0                # max grad norm; 0 disables clipping
    verbalizer_lr: float | None = None  # verb-FFN learning rate (default: lr)


@dataclass
class TrainConfig:
    batch_size: int = 16             # micro-batch per process
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100      # optimizer steps; stage boundaries always checkpoint
    keep_checkpoints: int = 2
    grad_checkpointing: bool = False
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    max_length: int | None = None
    distributed: Literal["ddp", "fsdp2"] = "ddp"   # under torchrun
    # scene targets: records' `aux` lists regressed by a zero-initialised linear head on decoder layer aux_layer
    # (default: half the depth) at every text position after the image, MSE weighted by aux_weight (0: off)
    aux_weight: float = 0.0
    aux_layer: int | None = None
    aux_init: str | None = None      # start the head from RUN/aux_head.safetensors of an earlier stage
    # place target: every image token regresses its own row and column in its image's token grid ((i + 0.5) / n),
    # by a zero-initialised linear head on decoder layer place_layer (default: a quarter of the depth), MSE weighted
    # by place_weight (0: off); layer 0 is the language model's input, so the vision tower's output is what learns
    # it. Needs no data; models whose batches carry `image_grid_thw` (Qwen-VL families).
    place_weight: float = 0.0
    place_layer: int | None = None


@dataclass
class LoraConfig:
    enabled: bool = False            # tiny models: full fine-tuning; real models: LoRA 64/64 (paper)
    r: int = 64
    alpha: int = 64
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class VerbalizerConfig:
    residual: bool = True            # logits = lm_head(norm(h + v)); false: lm_head(norm(v)) (paper-literal)


@dataclass
class MatchingConfig:
    strategy: Literal["multinomial", "random", "uniform", "bottom-k"] = "multinomial"
    bottom_k: int = 1
    search_range: bool = True        # candidates start .. t_l - t_s + i
    order_preservation: bool = True  # next student layer matches a deeper teacher layer
    adaptive_temperature: bool = True
    temperature: Literal["a", "b"] = "a"   # a: T = scale / (max - min + eps); b: T = (max - min + eps) / scale
    scale: float = 2.0
    eps: float = 1e-6
    fixed_temperature: float = 1.0   # used when adaptive_temperature is off
    window: int = 50                 # matching.json counts per window of this many steps


@dataclass
class LossConfig:
    intermediate: Literal["kld", "ce", "l2", "none"] = "kld"
    last: Literal["kld", "ce", "l2", "none"] = "kld"
    kl: Literal["forward", "reverse"] = "forward"   # forward: KL(teacher || student)
    chunk_size: int = 1024           # response tokens per vocab-space chunk


@dataclass
class KDConfig:
    kl: Literal["forward", "reverse"] = "forward"
    temperature: float = 1.0
    ce_weight: float = 0.0


@dataclass
class CacheConfig:
    dir: str | None = None           # --cache-teacher DIR: precomputed top-k teacher log-probs
    top_k: int = 64
    shard_items: int = 512


@dataclass
class DistillConfig:
    method: Literal["vlsi", "sft", "kd"] = "vlsi"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    student: str = "builtin:tiny-qwen2vl-student"
    teacher: str | None = "builtin:tiny-qwen2vl-teacher"
    data: str = "builtin:shapes"
    split: str = "train"
    image_root: str | None = None
    skip_bad_samples: bool = False
    teacher_verbalizers: str | None = None
    student_image_size: int | None = None  # train the student at this square size (Qwen-VL families)
    student_target_layers: list[int] | None = None
    teacher_target_layers: list[int] | None = None
    steps: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_STEPS))  # optimizer steps per stage
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    verbalizer: VerbalizerConfig = field(default_factory=VerbalizerConfig)
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    def __post_init__(self):
        problems = _check_types(self)
        if not problems:  # value rules assume the types are right
            problems = self._check_values()
        if problems:
            raise ConfigError(problems, "fix the preset or flags; `vlsi-edge distill --help` lists them")

    def _check_values(self) -> list[str]:
        p = []
        self.steps = {**DEFAULT_STEPS, **self.steps}
        if self.method == "sft":
            if self.stages != ["sft"]:
                self.stages = ["sft"]
        elif self.method == "kd":
            if self.stages != ["kd"]:
                self.stages = ["kd"]
        else:
            bad = [s for s in self.stages if s not in STAGES]
            if bad or not self.stages:
                p.append(f"stages {self.stages}: expected a non-empty subset of {list(STAGES)}")
            elif [s for s in STAGES if s in self.stages] != list(self.stages):
                p.append(f"stages {self.stages}: expected the order verbalize, interact, sft")
        if not self.teacher and (self.method == "kd" or (self.method == "vlsi" and "interact" in self.stages)):
            p.append(f"method {self.method} needs --teacher")
        for stage, n in self.steps.items():
            if stage not in (*STAGES, "kd"):
                p.append(f"steps.{stage}: unknown stage; expected one of {[*STAGES, 'kd']}")
            elif not isinstance(n, int) or n < 0:
                p.append(f"steps.{stage} = {n!r}: expected an integer >= 0")
        positive = {"train.batch_size": self.train.batch_size, "train.grad_accum": self.train.grad_accum,
                    "train.log_every": self.train.log_every, "train.checkpoint_every": self.train.checkpoint_every,
                    "train.keep_checkpoints": self.train.keep_checkpoints, "loss.chunk_size": self.loss.chunk_size,
                    "lora.r": self.lora.r, "matching.bottom_k": self.matching.bottom_k,
                    "matching.window": self.matching.window, "cache.top_k": self.cache.top_k,
                    "cache.shard_items": self.cache.shard_items}
        p += [f"{k} = {v}: expected > 0" for k, v in positive.items() if v <= 0]
        nonneg = {"optim.lr": self.optim.lr, "optim.warmup_steps": self.optim.warmup_steps,
                  "optim.weight_decay": self.optim.weight_decay, "optim.clip": self.optim.clip,
                  "optim.min_lr_ratio": self.optim.min_lr_ratio, "train.aux_weight": self.train.aux_weight,
                  "train.place_weight": self.train.place_weight}
        p += [f"{k} = {v}: expected >= 0" for k, v in nonneg.items() if v < 0]
        if self.train.aux_layer is not None and self.train.aux_layer < 1:
            p.append(f"train.aux_layer = {self.train.aux_layer}: expected a decoder layer number >= 1")
        if self.train.place_layer is not None and self.train.place_layer < 0:
            p.append(f"train.place_layer = {self.train.place_layer}: expected a decoder layer number >= 0 (0: the "
                     "language model's input, where image tokens are the vision tower's output)")
        for name in ("scale", "eps", "fixed_temperature"):
            if getattr(self.matching, name) <= 0:
                p.append(f"matching.{name} = {getattr(self.matching, name)}: expected > 0")
        if self.kd.temperature <= 0:
            p.append(f"kd.temperature = {self.kd.temperature}: expected > 0")
        if self.cache.dir and self.loss.kl == "reverse" and self.method == "vlsi":
            p.append("loss.kl = reverse needs the full teacher distribution; a top-k teacher cache cannot give it "
                     "(drop --cache-teacher or use loss.kl: forward)")
        if self.cache.dir and self.kd.kl == "reverse" and self.method == "kd":
            p.append("kd.kl = reverse cannot use a top-k teacher cache")
        if self.cache.dir and self.method == "kd" and self.kd.temperature != 1.0:
            p.append(f"kd.temperature = {self.kd.temperature} cannot use a teacher cache built at temperature 1 "
                     "(drop --cache-teacher or use kd.temperature: 1.0)")
        if self.student_image_size is not None and self.student_image_size <= 0:
            p.append(f"student_image_size = {self.student_image_size}: expected > 0")
        for name in ("student_target_layers", "teacher_target_layers"):
            layers = getattr(self, name)
            if layers is not None and (not layers or sorted(set(layers)) != list(layers) or min(layers) < 1):
                p.append(f"{name} {layers}: expected increasing layer numbers >= 1")
        return p

    # presets ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict, overrides: dict | None = None) -> "DistillConfig":
        merged = _merge(dict(data or {}), overrides or {})
        problems: list[str] = []
        obj = _build(cls, merged, "", problems)
        if problems:
            raise ConfigError(problems, "fix the preset or flags; unknown keys are refused, not ignored")
        return obj

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None) -> "DistillConfig":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config {path} not found", "pass a YAML preset, e.g. one of vlsi_edge/recipes/")
        try:
            data = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
        return cls.from_dict(data, overrides)


def recipe_path(name: str) -> Path:
    from importlib import resources

    return Path(str(resources.files("vlsi_edge.recipes").joinpath(f"{name}.yaml")))


def recipes() -> list[str]:
    from importlib import resources

    return sorted(p.name.removesuffix(".yaml") for p in resources.files("vlsi_edge.recipes").iterdir()
                  if p.name.endswith(".yaml"))


# ----------------------------------------------------------------------------------------------- helpers
def _merge(base: dict, overrides: dict) -> dict:
    """Apply dotted overrides ("train.batch_size": 8) onto a nested dict."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                break
        else:
            node[leaf] = value
    return out


def _build(cls, data, prefix: str, problems: list[str]):
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
        return cls.__new__(cls)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            problems.append(f"unknown key {prefix}{key} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            value = _build(hints[f.name], value, f"{prefix}{f.name}.", problems)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except ConfigError as e:
        problems.extend(e.problems)
        return cls.__new__(cls)


def _check_types(obj, prefix: str = "") -> list[str]:
    problems = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, ann, name = getattr(obj, f.name), hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(ann):
            problems += _check_types(value, f"{name}.") if dataclasses.is_dataclass(value) else \
                [f"{name}: expected a mapping"]
        elif not _matches(value, ann):
            problems.append(f"{name} = {value!r}: expected {_describe(ann)}")
    return problems


def _matches(value, ann) -> bool:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if ann is typing.Any:
        return True
    if origin is typing.Literal:
        return value in args
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_matches(value, a) for a in args)
    if ann is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value) if args else \
            isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1])
                                               for k, v in value.items())
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, ann)


def _describe(ann) -> str:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_describe(a) for a in args)
    if ann is type(None):
        return "null"
    return getattr(ann, "__name__", str(ann))
