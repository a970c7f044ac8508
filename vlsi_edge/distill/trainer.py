"""The one training loop behind `vlsi-edge train` and `vlsi-edge distill` (every method, every phase).

    vlsi-edge distill --teacher builtin:tiny-qwen2vl-teacher --student builtin:tiny-qwen2vl-student \
        --data builtin:shapes --out runs/vlsi
    torchrun --nproc-per-node 2 -m vlsi_edge.cli distill ...      # DDP (or FSDP2 with --set train.distributed=fsdp2)

Plain PyTorch, top to bottom: AdamW, warm-up + cosine restarted per phase, gradient accumulation, clipping, bf16
autocast on CUDA, atomic checkpoints every N steps and at phase ends, exact resume. The run folder holds
`config.yaml`, `state/`, `metrics.jsonl`, `matching.json`, `verbalizers/` and the final `student/` checkpoint.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vlsi_edge import fileio
from vlsi_edge.config import DistillConfig
from vlsi_edge.distill import checkpoint as ckpt
from vlsi_edge.distill.stages import (
    SCENE_PHASES,
    Context,
    Side,
    image_token_id,
    phase_loss,
    place_target,
    response_tokens,
    trainable_parameters,
)
from vlsi_edge.distill.verbalizer import Verbalizers, fingerprint
from vlsi_edge.errors import ConfigError, UserError


# ------------------------------------------------------------------------------------------ distributed
class Dist:
    """torchrun's environment, or a single process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        t = t.clone()
        torch.distributed.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


# ------------------------------------------------------------------------------------------ the run
def phases_for(cfg: DistillConfig, have_teacher_verbalizers: bool) -> list[str]:
    if cfg.method in ("sft", "kd"):
        return [cfg.method]
    out = []
    for stage in cfg.stages:
        if stage == "verbalize":
            if cfg.teacher and not have_teacher_verbalizers:
                out.append("verbalize-teacher")
            out.append("verbalize-student")
        else:
            out.append(stage)
    return out


def steps_for(cfg: DistillConfig, phase: str) -> int:
    return cfg.steps.get(phase.split("-")[0], 0)


def check_vocabulary(student, teacher) -> int:
    """The common real vocabulary (METHOD.md): same tokenizer and token order, padded heads may differ."""
    if student.family != teacher.family:
        raise UserError(f"teacher family {teacher.family} and student family {student.family} differ; VLsI distils "
                        "within one family", "pick a teacher and student of the same family")
    s_tok, t_tok = student.tokenizer, teacher.tokenizer
    s_vocab = s_tok.convert_ids_to_tokens(list(range(len(s_tok))))
    t_vocab = t_tok.convert_ids_to_tokens(list(range(len(t_tok))))
    for i, (a, b) in enumerate(zip(s_vocab, t_vocab)):
        if a != b:
            raise UserError(f"teacher and student tokenizers differ (vocab sizes {len(t_tok)} and {len(s_tok)}; first "
                            f"mismatch at id {i}: teacher {b!r}, student {a!r})",
                            "VLsI compares distributions token by token: use models that share a tokenizer")
    if len(s_vocab) != len(t_vocab):
        raise UserError(f"teacher and student tokenizers differ in size ({len(t_vocab)} vs {len(s_vocab)} tokens)",
                        "use models that share a tokenizer")
    vocab = len(s_vocab)
    for who, m in (("student", student), ("teacher", teacher)):
        if m.vocab_size < vocab:
            raise UserError(f"{who} lm_head has {m.vocab_size} rows but its tokenizer has {vocab} tokens")
    return vocab


def _resolve_layers(adapter, override, who: str) -> list[int]:
    layers = list(override) if override else list(adapter.target_layers)
    bad = [k for k in layers if not 1 <= k < adapter.num_layers]
    if bad:
        raise ConfigError(f"{who} target layers {bad} are outside 1..{adapter.num_layers - 1} (the model has "
                          f"{adapter.num_layers} decoder layers; the last layer is matched by the final term)")
    return layers


def _lr_lambda(cfg: DistillConfig, total: int):
    warm, floor = cfg.optim.warmup_steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def _rng_state() -> dict:
    return {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
            "numpy": np.random.get_state()[1].tolist(), "numpy_pos": int(np.random.get_state()[2])}


def _set_rng(state: dict, torch_state: torch.Tensor | None) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    if torch_state is not None:
        torch.set_rng_state(torch_state)


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, phase: str, epoch: int, n: int) -> list[int]:
    digest = hashlib.blake2b(f"{seed}/{phase}/{epoch}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return torch.randperm(n, generator=g).tolist()


def _visible(folder: Path) -> list[Path]:
    """What a run folder holds, less the hidden leftovers of a killed run (temporaries, write probes)."""
    return [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []


class Trainer:
    def __init__(self, cfg: DistillConfig, out: Path, resume: bool = False, overwrite: bool = False, log=None):
        self.cfg, self.out, self.resume = cfg, Path(out), resume
        self.dist = Dist()
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True) if self.dist.main else None)
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if torch.cuda.is_available() else "cpu")
        self._sharded = False
        self._prepare_out(overwrite)

    # run folder -----------------------------------------------------------------------------------------
    def _prepare_out(self, overwrite: bool) -> None:
        out, cfg_path = self.out, self.out / "config.yaml"
        if self.resume and not cfg_path.is_file() and not _visible(out):
            # killed before the run wrote its config (or never started): a scheduler that always passes --resume
            # gets a fresh start, as after a kill before the first checkpoint
            self.log(f"--resume: {out} holds no run yet; starting it")
            self.resume = False
        if self.resume:
            if not cfg_path.is_file():
                raise UserError(f"--resume: {out} holds no run (no config.yaml)", "drop --resume to start it")
            self._check_same_config(cfg_path)
            return
        if _visible(out):
            if not overwrite:
                raise UserError(f"output folder {out} already holds files",
                                "pass --resume to continue that run, --overwrite to replace it, or another --out")
            if self.dist.main:
                shutil.rmtree(out)
        self.dist.barrier()
        self._created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test.{os.getpid()}"  # one per rank: ranks probe at the same time
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(f"cannot write to output folder {out} ({e.strerror})", "choose a writable --out") from None

    def _check_same_config(self, cfg_path: Path) -> None:
        old = DistillConfig.from_yaml(cfg_path).to_dict()
        new = self.cfg.to_dict()
        diffs = []

        def walk(a, b, prefix=""):
            for key in sorted(set(a) | set(b)):
                va, vb = a.get(key), b.get(key)
                if isinstance(va, dict) and isinstance(vb, dict) and key != "steps":
                    walk(va, vb, f"{prefix}{key}.")
                elif va != vb:
                    diffs.append(f"{prefix}{key}: {va!r} -> {vb!r}")
        walk(old, new)
        if diffs:
            raise UserError("--resume with a different config: " + "; ".join(diffs[:8]),
                            "resume with the run's own settings, or start a new --out")

    # setup ----------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from vlsi_edge.data.conversations import open_dataset
        from vlsi_edge.models import load_model

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        dataset = open_dataset(cfg.data, split=cfg.split, image_root=cfg.image_root, skip_bad=cfg.skip_bad_samples)
        dataset.validate()
        if dataset.skipped:
            self.log(f"skipped {sum(dataset.skipped.values())} bad samples: "
                     + ", ".join(f"{k} x{v}" for k, v in sorted(dataset.skipped.items())))
        self.samples = list(dataset)
        if not self.samples:
            raise UserError(f"dataset {cfg.data} (split {cfg.split}) is empty", "point --data at a split with samples")
        on_cuda = self.device.type == "cuda"
        student = load_model(cfg.student, dtype="float32", device=str(self.device))
        if cfg.student_image_size and cfg.student_image_size != student.image_size:
            student.set_image_size(cfg.student_image_size)
        teacher = None
        needs_teacher = cfg.method == "kd" or (cfg.method == "vlsi" and cfg.teacher and (
            "interact" in cfg.stages or ("verbalize" in cfg.stages and not cfg.teacher_verbalizers)))
        self.uses_cache = bool(cfg.cache.dir) and (cfg.method == "kd" or "interact" in cfg.stages)
        cached = self._ready_cache() if self.uses_cache else None
        if needs_teacher and cached is None:
            teacher = load_model(cfg.teacher, dtype="bfloat16" if on_cuda else "float32", device=str(self.device))
            teacher.model.requires_grad_(False)
        self.s_layers = _resolve_layers(student, cfg.student_target_layers, "student")
        if cached is not None:  # the teacher stays on disk: its layers and vocabulary come from the cache
            self.t_layers, self.vocab = list(cached.layers), cached.vocab
            if self.vocab > len(student.tokenizer) or self.vocab > student.vocab_size:
                raise UserError(f"teacher cache {cfg.cache.dir} covers {self.vocab} tokens; the student's tokenizer "
                                f"has {len(student.tokenizer)}", "build the cache for a teacher of this family")
            if cfg.method == "vlsi" and len(self.t_layers) < len(self.s_layers):
                raise ConfigError(f"the cached teacher has {len(self.t_layers)} target layers, fewer than the "
                                  f"student's {len(self.s_layers)}")
        elif teacher is not None:
            self.vocab = check_vocabulary(student, teacher)
            self.t_layers = _resolve_layers(teacher, cfg.teacher_target_layers, "teacher")
            if cfg.method == "vlsi" and len(self.t_layers) < len(self.s_layers):
                raise ConfigError(f"the teacher has {len(self.t_layers)} target layers, fewer than the student's "
                                  f"{len(self.s_layers)}; layer matching needs at least as many")
        else:
            self.vocab = len(student.tokenizer)
            self.t_layers = list(cfg.teacher_target_layers or [])
        if cfg.train.grad_checkpointing:
            student.model.gradient_checkpointing_enable()
        self.lora = cfg.lora.enabled
        if self.lora:
            self._add_lora(student)
        s_verb = Verbalizers(self.s_layers, student.hidden_size, cfg.verbalizer.residual).to(self.device)
        t_verb = None
        # a ready cache embodies the teacher's verbalizers; given ones are checked below when the teacher is loaded
        # (a verbalize-only run with --teacher-verbalizers needs no teacher: it trains the student's alone)
        self.have_teacher_verbalizers = cached is not None or bool(cfg.teacher_verbalizers)
        if cached is not None:
            self.log(f"teacher cache {cfg.cache.dir} is complete: the teacher stays on disk")
        if teacher is not None:
            t_hash = fingerprint(teacher.model)
            self.teacher_hash = t_hash
            if cfg.teacher_verbalizers:
                t_verb = Verbalizers.load(cfg.teacher_verbalizers, expect_layers=self.t_layers, expect_hash=t_hash,
                                          expect_hidden=teacher.hidden_size).to(self.device)
                self.have_teacher_verbalizers = True
            else:
                t_verb = Verbalizers(self.t_layers, teacher.hidden_size, cfg.verbalizer.residual).to(self.device)
        self.student_side = Side(student, s_verb, *self._scene_head(student), *self._place_head(student))
        self.teacher_side = Side(teacher, t_verb) if teacher is not None else None
        self.phases = phases_for(cfg, self.have_teacher_verbalizers)
        if "interact" in self.phases and teacher is None and not cfg.cache.dir:
            raise ConfigError("the interact stage needs --teacher (or --cache-teacher)")
        from vlsi_edge.data.collate import Collator
        from vlsi_edge.distill.matching import MatchingLog

        self.s_collate = Collator(student, mode="train", max_length=cfg.train.max_length)
        self.t_collate = Collator(teacher, mode="train", max_length=cfg.train.max_length) if teacher else None
        self.matching_log = MatchingLog(self.s_layers, self.t_layers, cfg.matching.window) \
            if "interact" in self.phases else None
        self.ctx = Context(cfg=cfg, student=self.student_side, teacher=self.teacher_side, vocab=self.vocab,
                           s_layers=self.s_layers, t_layers=self.t_layers, reduce_sum=self.dist.reduce_sum,
                           teacher_cache=None, matching_log=self.matching_log)

    def _scene_head(self, student) -> tuple:
        """(head, layer) for `train.aux_weight > 0`: a zero-initialised linear map from decoder layer `aux_layer`
        to the records' `aux` targets (the head first learns to read, so no early error reaches the model);
        (None, 0) when off. Checks every record's target and builds the [samples, A] target table (NaN: none)."""
        cfg = self.cfg.train
        if not cfg.aux_weight:
            return None, 0
        layer = cfg.aux_layer or max(1, student.num_layers // 2)
        if layer > student.num_layers:
            raise ConfigError(f"train.aux_layer = {layer} is beyond the student's {student.num_layers} layers",
                              f"expected 1..{student.num_layers}")
        width, rows = None, []
        for sample in self.samples:
            aux = sample.meta.get("aux")
            if aux is None:
                rows.append(None)
                continue
            if not isinstance(aux, list) or not aux or not all(
                    v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
                    for v in aux):
                raise UserError(f"sample {sample.id!r}: 'aux' is not a non-empty list of finite numbers or nulls",
                                "expected e.g. \"aux\": [0.2, 1, null] (builtin:shapes:scene_targets=1 writes them)")
            if width is not None and len(aux) != width:
                raise UserError(f"sample {sample.id!r}: 'aux' has {len(aux)} entries, earlier samples {width}",
                                "expected the same target layout in every record")
            width = len(aux)
            rows.append(aux)
        if width is None:
            raise UserError(f"train.aux_weight = {cfg.aux_weight} but no sample of {self.cfg.data} (split "
                            f"{self.cfg.split}) has an 'aux' target",
                            "add scene_targets=1 to a builtin:shapes spec, or set train.aux_weight=0")
        nan = [math.nan] * width     # keyed by the sample object below: record ids need not be unique
        self.aux_table = {id(s): torch.tensor([math.nan if v is None else v for v in (r or nan)], dtype=torch.float32)
                          for s, r in zip(self.samples, rows)}
        head = self._zero_head(student.hidden_size, width)
        if cfg.aux_init:
            head.load_state_dict(_load_scene_head(Path(cfg.aux_init), head))
        self.log(f"scene targets: {width} per record ({sum(r is not None for r in rows):,} of {len(rows):,} "
                 f"records), head on decoder layer {layer}, weight {cfg.aux_weight}")
        return head, layer

    def _zero_head(self, hidden: int, width: int) -> torch.nn.Linear:
        """A linear head starting at zero: it first learns to read, so no early error reaches the model."""
        head = torch.nn.Linear(hidden, width).to(self.device)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        return head

    def _place_head(self, student) -> tuple:
        """(head, layer) for `train.place_weight > 0`: a zero-initialised linear map from decoder layer
        `place_layer` to each image token's (row, column) in its image; (None, 0) when off."""
        cfg = self.cfg.train
        if not cfg.place_weight:
            return None, 0
        layer = max(1, student.num_layers // 4) if cfg.place_layer is None else cfg.place_layer
        if layer > student.num_layers:
            raise ConfigError(f"train.place_layer = {layer} is beyond the student's {student.num_layers} layers",
                              f"expected 1..{student.num_layers}")
        config = student.model.config
        merge = getattr(getattr(config, "vision_config", None), "spatial_merge_size", None)
        if merge is None or image_token_id(config) is None:
            raise ConfigError(f"train.place_weight needs a Qwen-VL family student (image grids in the batch); "
                              f"{self.cfg.student} is {student.family}", "set train.place_weight=0")
        self.place_merge = int(merge)
        head = self._zero_head(student.hidden_size, 2)
        self.log(f"place target: every image token's row and column, head on decoder layer {layer}, "
                 f"weight {cfg.place_weight}")
        return head, layer

    def _cache_identity(self, full: bool) -> dict:
        cfg = self.cfg
        ident = {"teacher": cfg.teacher, "data": cfg.data, "split": cfg.split, "n_samples": len(self.samples),
                 "top_k": cfg.cache.top_k}
        if full:
            ident.update(teacher_hash=self.teacher_hash, t_layers=list(self.t_layers), vocab=self.vocab,
                         teacher_verbalizers_hash=fingerprint(self.teacher_side.verb))
        return ident

    def _ready_cache(self):
        """The teacher cache when it is complete for this run (no teacher needed), else None."""
        from vlsi_edge.distill.teacher_cache import open_cache, ready

        if not ready(self.cfg.cache.dir, self._cache_identity(full=False)):
            return None
        return open_cache(self.cfg.cache.dir, self._cache_identity(full=False), device=self.device)

    def _open_or_build_cache(self) -> None:
        """Before the teacher is needed by interact/kd: build the cache once (rank 0), then drop the teacher."""
        from vlsi_edge.distill.teacher_cache import build_cache, open_cache

        if self.ctx.teacher_cache is not None:
            return
        cached = self._ready_cache()
        if cached is None:
            identity = self._cache_identity(full=True)
            if self.dist.main:
                build_cache(Path(self.cfg.cache.dir), self.teacher_side, self.t_layers, self.samples, self.t_collate,
                            self.vocab, self.cfg.cache.top_k, self.cfg.loss.chunk_size, self.cfg.cache.shard_items,
                            self.cfg.train.batch_size, identity, self.log)
            self.dist.barrier()
            cached = open_cache(self.cfg.cache.dir, identity, device=self.device)
        self.ctx.teacher_cache = cached
        self.teacher_side = self.ctx.teacher = self.t_collate = None  # the interaction runs without the teacher

    def _add_lora(self, adapter) -> None:
        import re

        from peft import LoraConfig, get_peft_model

        lm_name = next(n for n, m in adapter.model.named_modules() if getattr(m, "layers", None) is adapter.decoder_layers)
        names = "|".join(re.escape(t) for t in self.cfg.lora.target_modules)
        pattern = rf"^{re.escape(lm_name)}\.layers\.\d+\..*\b({names})$"
        lcfg = LoraConfig(r=self.cfg.lora.r, lora_alpha=self.cfg.lora.alpha, lora_dropout=self.cfg.lora.dropout,
                          target_modules=pattern)
        self.peft_model = get_peft_model(adapter.model, lcfg)  # injects in place; adapter.model stays the base

    # the loop -------------------------------------------------------------------------------------------
    def run(self) -> Path:
        try:
            self.setup()  # every input is checked here, before the run folder holds anything
        except BaseException:
            if not self.resume and self.dist.main and self._created:
                shutil.rmtree(self.out, ignore_errors=True)
            raise
        if not self.resume and self.dist.main:
            with fileio.atomic_path(self.out / "config.yaml") as tmp:
                self.cfg.to_yaml(tmp)
        state = ckpt.load_latest(self.out / "state") if self.resume else None
        done_phases, resume_phase, resume_step = [], None, 0
        if state is not None:
            self._restore_models(state)
            done_phases = state.meta["done_phases"]
            resume_phase, resume_step = state.meta.get("phase"), state.meta.get("step", 0)
            self.log(f"resuming {self.out} at {resume_phase or 'end'} step {resume_step}")
            self._truncate_metrics(state.meta.get("metrics_lines", 0))
        elif self.resume:
            self.log(f"--resume: {self.out} has no checkpoint yet; starting from the beginning")
            self._truncate_metrics(0)  # the killed attempt's lines
        for phase in self.phases:
            if phase in done_phases:
                continue
            start = resume_step if phase == resume_phase else 0
            if self.uses_cache and phase in ("interact", "kd"):
                self._open_or_build_cache()
            self._run_phase(phase, start, state if phase == resume_phase else None, done_phases)
            done_phases.append(phase)
            state = None
        return self._finish(done_phases)

    def _micro_batches(self, phase: str, step: int) -> list[tuple[list, int]]:
        """This rank's micro-batches of optimizer step `step`: (samples, global micro index)."""
        cfg, world = self.cfg, self.dist.world
        b, accum = cfg.train.batch_size, cfg.train.grad_accum
        n = len(self.samples)
        out = []
        for m in range(accum):
            base = (step * accum + m) * b * world + self.dist.rank * b
            chosen = []
            for pos in range(base, base + b):
                epoch, k = divmod(pos, n)
                chosen.append(self.samples[_permutation(cfg.train.seed, phase, epoch, n)[k]])
            out.append((chosen, step * accum + m))
        return out

    def _collate(self, phase: str, samples: list) -> dict:
        if phase == "verbalize-teacher":
            batch = self.t_collate(samples)
        else:
            batch = self.s_collate(samples)
            if phase in SCENE_PHASES and self.student_side.aux is not None:
                batch["aux_target"] = torch.stack([self.aux_table[id(s)] for s in samples])
            if phase in SCENE_PHASES and self.student_side.place is not None:
                grids = batch.get("image_grid_thw", torch.zeros(0, 3, dtype=torch.long))  # none: a text-only batch
                batch["place_target"] = place_target(batch["input_ids"], grids, self.place_merge,
                                                     image_token_id(self.student_side.model.config))
            if phase in ("interact", "kd") and self.t_collate is not None:
                batch["teacher_batch"] = {k: v.to(self.device) for k, v in self.t_collate(samples).items()}
        return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def _run_phase(self, phase: str, start: int, state, done_phases: list[str]) -> None:
        cfg = self.cfg
        total = steps_for(cfg, phase)
        trains_verbalizers = phase.startswith("verbalize") or phase == "interact"
        trainable_parameters(phase, self.ctx, self.lora)  # sets requires_grad before DDP/FSDP2 see the modules
        call = self._wrap(phase)
        side = self.teacher_side if phase == "verbalize-teacher" else self.student_side
        model_params = [p for p in side.model.parameters() if p.requires_grad]  # after wrapping: FSDP2 swaps them
        for head in (side.aux, side.place):
            if head is not None:
                model_params += [p for p in head.parameters() if p.requires_grad]
        verb_params = [p for p in side.verb.parameters() if p.requires_grad]
        groups = []
        decay = cfg.optim.weight_decay
        if model_params:
            groups.append({"params": model_params, "lr": cfg.optim.lr, "weight_decay": decay})
        if verb_params:
            groups.append({"params": verb_params, "lr": cfg.optim.verbalizer_lr or cfg.optim.lr,
                           "weight_decay": decay})
        opt = torch.optim.AdamW(groups, betas=(cfg.optim.beta1, cfg.optim.beta2), foreach=False)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total))
        if state is not None and state.optimizer is not None:
            if self._sharded:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(side, opt, state.optimizer["optimizer"],
                                         options=StateDictOptions(full_state_dict=True))
            else:
                opt.load_state_dict(state.optimizer["optimizer"])
            sched.load_state_dict(state.optimizer["scheduler"])
        params = model_params + verb_params
        self.log(f"phase {phase}: {total} steps, {sum(p.numel() for p in params):,} trainable parameters")
        progress = _Progress(phase, total, start, enabled=self.dist.main)
        on_cuda = self.device.type == "cuda"
        for step in range(start, total):
            t0 = time.perf_counter()
            micro = [(self._collate(phase, s), key, [x.id for x in s]) for s, key in self._micro_batches(phase, step)]
            n_local = sum(response_tokens(b) for b, _, _ in micro)
            n_global = self.dist.reduce_sum(torch.tensor([float(n_local)], device=self.device)).item()
            loss_sum, logs_acc, skipped = 0.0, {}, 0
            for m, (batch, key, ids) in enumerate(micro):
                if response_tokens(batch) == 0:
                    skipped += 1
                sync = m == len(micro) - 1
                with (call.no_sync() if hasattr(call, "no_sync") and not sync else contextlib.nullcontext()), \
                        (torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()):
                    loss, logs = phase_loss(phase, self.ctx, batch, key, ids, trained_call=call)
                if not torch.isfinite(loss):
                    raise UserError(f"non-finite loss ({loss.item()}) in phase {phase} at step {step}; the last good "
                                    f"checkpoint in {self.out / 'state'} is kept",
                                    "lower --lr (or optim.lr) and rerun with --resume")
                if n_global > 0:
                    (loss * (self.dist.world / n_global)).backward()
                loss_sum += loss.item()
                for k, v in logs.items():
                    logs_acc[k] = v if k == "matched" else logs_acc.get(k, 0.0) + float(v)
            loss_global = self.dist.reduce_sum(torch.tensor([loss_sum], device=self.device)).item()
            grad_norm = None
            if n_global > 0 and cfg.optim.clip:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip))
            opt.step()  # parameters without a gradient (an all-masked step) are left alone
            opt.zero_grad(set_to_none=True)
            sched.step()
            record = {"phase": phase, "step": step + 1, "loss": loss_global / max(n_global, 1.0),
                      "tokens": int(n_global), "lr": sched.get_last_lr()[0], "sec": time.perf_counter() - t0}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            if skipped:
                record["skipped_batches"] = skipped
            for k, v in logs_acc.items():
                record[k] = v if k == "matched" else v / max(n_local, 1)
            progress.update(record)
            last = step + 1 == total
            if self.dist.main and (last or (step + 1) % cfg.train.log_every == 0 or step == start):
                self._write_metrics(record)
            if last and trains_verbalizers:  # before the checkpoint that marks the phase done: a kill between
                self._save_verbalizers(phase)  # the two must not leave the previous phase's file for good
            if last or (step + 1) % cfg.train.checkpoint_every == 0:
                self._save_state(phase, step + 1, side, opt, sched, done_phases + ([phase] if last else []))
        progress.close()
        if trains_verbalizers and start >= total:  # no step ran here (nothing to train in this phase)
            self._save_verbalizers(phase)

    def _wrap(self, phase: str):
        """The trained side as this phase calls it: wrapped by DDP (or sharded by FSDP2) under torchrun."""
        side = self.teacher_side if phase == "verbalize-teacher" else self.student_side
        if self.dist.world == 1:
            return side
        if phase.startswith("verbalize"):  # frozen backbone: only the verbalizers train, DDP syncs them
            from torch.nn.parallel import DistributedDataParallel as DDP

            return DDP(side, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.train.distributed == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            if not self._sharded:
                for layer in self.student_side.adapter.decoder_layers:
                    fully_shard(layer)
                # the root (embeddings, vision tower, lm_head, verbalizers) stays gathered from forward to
                # backward: the vocab-space losses read lm_head.weight outside any module's forward
                fully_shard(self.student_side, reshard_after_forward=False)
                self._sharded = True
            return self.student_side
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(self.student_side, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                   find_unused_parameters=False)

    # state ----------------------------------------------------------------------------------------------
    def _student_state(self) -> dict[str, torch.Tensor]:
        """The student side's full state (model.* and verb.*); a collective under FSDP2 (every rank calls it)."""
        if self._sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.student_side,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.student_side.state_dict()

    def _save_state(self, phase: str, step: int, side, opt, sched, done: list[str]) -> None:
        finished = phase in done
        full = self._student_state()
        optim_state = None
        if not finished:
            if self._sharded and side is self.student_side:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

                optim_state = get_optimizer_state_dict(side, opt, options=StateDictOptions(full_state_dict=True,
                                                                                           cpu_offload=True))
            else:
                optim_state = opt.state_dict()
        if not self.dist.main:
            self.dist.barrier()
            return
        tensors = {}
        for k, v in full.items():
            if k.startswith("model."):
                if not self.lora or "lora_" in k:
                    tensors["student." + k.removeprefix("model.")] = v
            elif k.startswith("verb."):
                tensors["student_verb." + k.removeprefix("verb.")] = v
            elif k.startswith(("aux.", "place.")):
                tensors["student_" + k] = v
        if self.teacher_side is not None and self.teacher_side.verb is not None:
            tensors.update({f"teacher_verb.{k}": v for k, v in self.teacher_side.verb.state_dict().items()})
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {"phase": None if finished else phase, "step": 0 if finished else step, "done_phases": done,
                "rng": _rng_state(), "metrics_lines": self._metrics_lines(),
                "matching": self.matching_log.to_json() if self.matching_log is not None else None}
        optimizer = None if finished else {"optimizer": optim_state, "scheduler": sched.state_dict()}
        ckpt.save_checkpoint(self.out / "state", f"{phase}-{step:07d}", tensors, optimizer, meta,
                             keep=self.cfg.train.keep_checkpoints)
        if self.matching_log is not None:
            fileio.write_json_atomic(self.out / "matching.json", self.matching_log.to_json())
        self.dist.barrier()

    def _restore_models(self, state) -> None:
        from vlsi_edge.distill.matching import MatchingLog

        t = state.tensors
        student = {k.removeprefix("student."): v for k, v in t.items() if k.startswith("student.")}
        model = self.student_side.model
        if self.lora:
            named = dict(model.named_parameters())
            with torch.no_grad():
                for k, v in student.items():
                    named[k].copy_(v)
        else:
            model.load_state_dict(student, strict=False)  # tied weights appear once in a gathered state
        self.student_side.verb.load_state_dict(
            {k.removeprefix("student_verb."): v for k, v in t.items() if k.startswith("student_verb.")})
        for name in ("aux", "place"):
            head = getattr(self.student_side, name)
            if head is not None:
                prefix = f"student_{name}."
                head.load_state_dict({k.removeprefix(prefix): v for k, v in t.items() if k.startswith(prefix)})
        tv = {k.removeprefix("teacher_verb."): v for k, v in t.items() if k.startswith("teacher_verb.")}
        if tv and self.teacher_side is not None:
            self.teacher_side.verb.load_state_dict(tv)
        if state.meta.get("matching") and self.matching_log is not None:
            self.matching_log = MatchingLog.from_json(state.meta["matching"])
            self.ctx.matching_log = self.matching_log
        _set_rng(state.meta["rng"], t.get("rng.torch"))

    def _save_verbalizers(self, phase: str) -> None:
        folder = self.out / "verbalizers"
        if phase == "verbalize-teacher":
            if self.dist.main:
                self.teacher_side.verb.save(folder / "teacher.safetensors", self.teacher_hash, "teacher")
            return
        full = self._student_state()  # every rank: a collective under FSDP2
        if self.dist.main:
            model = {k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.")}
            verb = {k.removeprefix("verb."): v for k, v in full.items() if k.startswith("verb.")}
            self.student_side.verb.save(folder / "student.safetensors", fingerprint(model), "student", state=verb)

    # metrics --------------------------------------------------------------------------------------------
    def _metrics_lines(self) -> int:
        path = self.out / "metrics.jsonl"
        return sum(1 for _ in path.open()) if path.exists() else 0

    def _write_metrics(self, record: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _truncate_metrics(self, keep: int) -> None:
        path = self.out / "metrics.jsonl"
        if self.dist.main and path.exists():
            lines = path.read_text().splitlines(keepends=True)[:keep]
            with fileio.atomic_path(path) as tmp:
                tmp.write_text("".join(lines))

    # the student ----------------------------------------------------------------------------------------
    def _finish(self, done: list[str]) -> Path:
        final = self.out / "student"
        if self._sharded:  # gather the full weights back into a plain module (collective)
            full = self._student_state()
            if self.dist.main:
                fresh = type(self.student_side.model)(self.student_side.model.config)
                fresh.load_state_dict({k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.")},
                                      strict=False)
                self.student_side.adapter.model = fresh
        if self.dist.main:
            adapter = self.student_side.adapter
            if self.lora:
                merged = self.peft_model.merge_and_unload()
                adapter.model = merged
            if self.student_side.aux is not None:   # for the next stage's train.aux_init; before student/ too
                from safetensors.torch import save_file

                head = {k.removeprefix("aux."): v for k, v in full.items() if k.startswith("aux.")} \
                    if self._sharded else self.student_side.aux.state_dict()
                with fileio.atomic_path(self.out / "aux_head.safetensors") as head_tmp:
                    save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, str(head_tmp),
                              metadata={"layer": str(self.student_side.aux_layer)})
            tmp = self.out / ".student.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            adapter.target_layers = self.s_layers
            adapter.save_pretrained(tmp)
            if self.matching_log is not None:  # before student/, whose arrival marks the run finished
                fileio.write_json_atomic(self.out / "matching.json", self.matching_log.to_json())
            fileio.publish_dir(tmp, final, True, None)  # swaps by rename: a kill leaves the old or the new, whole
            fileio.fsync_dir(self.out)
            self.log(f"done: {', '.join(done)}; student checkpoint at {final}")
        self.dist.barrier()
        return final


def _load_scene_head(path: Path, head: torch.nn.Linear) -> dict[str, torch.Tensor]:
    """The weights of RUN/aux_head.safetensors (a run folder is taken to mean that file), checked against `head`."""
    from safetensors.torch import load_file

    path = path / "aux_head.safetensors" if path.is_dir() else path
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"train.aux_init: {path} not found", "expected RUN/aux_head.safetensors of a run made with "
                        "train.aux_weight > 0") from None
    except Exception as e:  # not a safetensors file
        raise UserError(f"train.aux_init: {path} is not a safetensors file ({type(e).__name__})") from None
    want = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != want:
        raise UserError(f"train.aux_init: {path} holds {got}, this run's head needs {want}",
                        "use a head trained on the same aux layout and a model of the same hidden size")
    return state


class _Progress:
    """A rich progress bar on a terminal, plain log lines otherwise."""

    def __init__(self, phase: str, total: int, start: int, enabled: bool):
        self.phase, self.total, self.enabled = phase, total, enabled
        self.bar = None
        self.t0, self.start = time.perf_counter(), start
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task(phase, total=total, completed=start, info="")
            self.bar.start()

    def update(self, record: dict) -> None:
        if not self.enabled:
            return
        done = record["step"] - self.start
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        info = f"loss {record['loss']:.4f}  {rate:.2f} it/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=record["step"], info=info)
        elif record["step"] == self.total or record["step"] % max(1, self.total // 10) == 0:
            eta = (self.total - record["step"]) / max(rate, 1e-9)
            print(f"{self.phase} {record['step']}/{self.total}  {info}  eta {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
