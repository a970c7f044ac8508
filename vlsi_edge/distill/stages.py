"""What each training phase computes: the trainable set and the loss of one micro-batch.

Phases (METHOD.md): `verbalize-teacher`, `verbalize-student` (Step 1: frozen backbone, CE of every target layer's
verbalizer), `interact` (Step 2: candidate-KL matrix without grad → sampled matching → chosen pairs and the last
layer with grad), `sft` (Step 3 and the SFT-only baseline), `kd` (final-logit distillation baseline). Each loss is a
SUM over response tokens; the trainer divides by the global token count of the optimizer step, so N processes and
gradient accumulation reproduce one process with the same global batch.

VLsI: https://arxiv.org/abs/2412.01822 (§3.1 verbalization, §3.2 interaction, Algorithm 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from vlsi_edge.config import DistillConfig
from vlsi_edge.distill import losses
from vlsi_edge.distill.matching import candidate_pairs, match, matching_generator
from vlsi_edge.distill.verbalizer import Verbalizers


class Side(nn.Module):
    """One model plus its verbalizers, as one module (what DDP/FSDP wraps): forward gives response-token features.

    Returns `{layer: (N, D)}`: verbalizer features `norm(verbFFN(h_k))` for target layers and the post-norm final
    state for `num_layers`, gathered at the N response positions. With a scene-target head (`aux`, a linear layer
    on decoder layer `aux_layer`) and `aux_target` in the batch, also `"aux"`: the mean over text positions after
    the image of the squared error on the target's supervised entries, per row (`scene_loss`).
    """

    def __init__(self, adapter, verb: Verbalizers | None, aux: nn.Linear | None = None, aux_layer: int = 0,
                 place: nn.Linear | None = None, place_layer: int = 0):
        super().__init__()
        self.adapter = adapter
        self.model = adapter.model
        self.verb = verb
        self.aux = aux
        self.aux_layer = aux_layer
        self.place = place
        self.place_layer = place_layer

    def forward(self, batch: dict, layers: list[int], index: torch.Tensor, backbone_grad: bool) -> dict:
        aux_target = batch.pop("aux_target", None)
        place = batch.pop("place_target", None)
        wanted = list(layers) + ([self.aux_layer] if aux_target is not None else []) \
            + ([self.place_layer] if place is not None else [])
        with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
            states = self.adapter.hidden_states(batch, wanted)
        out = {}
        for k in layers:
            h = losses.gather(states[k], index)  # (N, D)
            out[k] = h if k == self.adapter.num_layers else self.verb.features(k, h, self.adapter.final_norm)
        if aux_target is not None:
            mask = text_after_image(batch, image_token_id(self.model.config))
            out["aux"] = scene_loss(self.aux(states[self.aux_layer]), aux_target, mask)
        if place is not None:
            out["place"] = place_loss(self.place(states[self.place_layer]), place)
        return out


def image_token_id(config) -> int | None:
    """The image placeholder's token id (Qwen-VL families: `image_token_id`; LLaVA ones: `image_token_index`)."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def text_after_image(batch: dict, image_token: int | None) -> torch.Tensor:
    """[batch, tokens] mask of the real tokens after each row's last image token (every real token of a row
    without one)."""
    ids = batch["input_ids"]
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    last = torch.where(ids == image_token, pos, torch.full_like(pos, -1)).amax(1, keepdim=True) \
        if image_token is not None else torch.full_like(pos[:, :1], -1)
    return (pos > last) & batch["attention_mask"].bool()


def scene_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row [B]: the squared error averaged over the row's supervised (finite) target entries and its masked
    positions; 0 for a row with neither (still in the graph, which DDP needs). pred [B, T, A], target [B, A] (NaN:
    not supervised), mask [B, T]."""
    known = torch.isfinite(target)
    per_entry = (pred - torch.nan_to_num(target)[:, None, :]) ** 2 * known[:, None, :]
    per_pos = per_entry.sum(-1) / known.sum(-1, keepdim=True).clamp(min=1)        # [B, T]
    use = mask & known.any(-1, keepdim=True)
    return (per_pos * use).sum(-1) / use.sum(-1).clamp(min=1)


def place_target(ids: torch.Tensor, grid_thw: torch.Tensor, merge: int, image_token: int) -> torch.Tensor:
    """[B, T, 2]: each image token's (row + 0.5) / rows and (col + 0.5) / cols in its image's grid of merged
    tokens, NaN at every other position. `grid_thw` [images, 3] holds each image's (t, h, w) in patches, images in
    the order their tokens appear (row by row through the batch), as Qwen-VL processors lay them out."""
    places = []
    for t, h, w in grid_thw.tolist():
        rows, cols = h // merge, w // merge
        r = torch.arange(rows).repeat_interleave(cols).repeat(t)
        c = torch.arange(cols).repeat(rows * t)
        places.append(torch.stack([(r + 0.5) / rows, (c + 0.5) / cols], -1))
    is_image = ids == image_token
    flat = torch.cat(places) if places else torch.zeros(0, 2)
    if int(is_image.sum()) != len(flat):
        raise ValueError(f"{int(is_image.sum())} image tokens in the batch but its image grids make {len(flat)}")
    out = torch.full((*ids.shape, 2), math.nan, device=ids.device)
    out[is_image] = flat.to(out)
    return out


def place_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row [B]: the squared error of pred [B, T, 2] against target [B, T, 2] averaged over both coordinates and
    the row's image tokens (finite targets); 0 for a row without image tokens (still in the graph, for DDP)."""
    known = torch.isfinite(target[..., 0])
    per_pos = ((pred - torch.nan_to_num(target)) ** 2).mean(-1)
    return (per_pos * known).sum(-1) / known.sum(-1).clamp(min=1)


@dataclass
class Context:
    cfg: DistillConfig
    student: Side
    teacher: Side | None
    vocab: int                       # common real-vocabulary prefix
    s_layers: list[int]
    t_layers: list[int]
    reduce_sum: object = None        # callable(Tensor) -> Tensor, all-reduce over ranks (identity when alone)
    teacher_cache: object = None     # TeacherCache or None
    matching_log: object = None
    stats: dict = field(default_factory=dict)


SCENE_PHASES = ("sft", "kd", "interact")     # the phases that train the student's backbone, and so its scene head


def trainable_parameters(phase: str, ctx: Context, lora: bool) -> tuple[list, list]:
    """(model params, verbalizer params) that this phase trains; everything else is frozen."""
    s_model, s_verb = ctx.student.model, ctx.student.verb
    for mod in [s_model, *([ctx.teacher.model] if ctx.teacher else [])]:
        mod.requires_grad_(False)
    for verb in (s_verb, ctx.teacher.verb if ctx.teacher else None):
        if verb is not None:
            verb.requires_grad_(False)
    model_params: list = []
    verb_params: list = []
    if phase == "verbalize-teacher":
        verb_params = list(ctx.teacher.verb.parameters())
    elif phase == "verbalize-student":
        verb_params = list(s_verb.parameters())
    else:
        if lora:
            model_params = [p for n, p in s_model.named_parameters() if "lora_" in n]
        else:
            head = ctx.student.adapter.lm_head.weight
            model_params = [p for p in s_model.parameters() if phase != "interact" or p is not head]
        if phase == "interact":
            verb_params = list(s_verb.parameters())
    for head in (ctx.student.aux, ctx.student.place):
        if head is not None:
            head.requires_grad_(False)
            if phase in SCENE_PHASES:
                model_params += list(head.parameters())
    for p in model_params + verb_params:
        p.requires_grad_(True)
    return model_params, verb_params


def response_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def phase_loss(phase: str, ctx: Context, batch: dict, step_key: int, item_ids: list[str] | None = None,
               trained_call=None) -> tuple[torch.Tensor, dict]:
    """SUM over this micro-batch's response tokens of the phase's loss, and what to log.

    `trained_call` is the trained side as the trainer wraps it (DDP under torchrun): the teacher side in
    `verbalize-teacher`, the student side otherwise.
    """
    cfg, vocab, chunk = ctx.cfg, ctx.vocab, ctx.cfg.loss.chunk_size
    trained_side = ctx.teacher if phase == "verbalize-teacher" else ctx.student
    trained_call = trained_call or trained_side
    labels = batch.pop("labels")
    index, targets = losses.response_positions(labels)
    per_row = (labels[:, 1:] != losses.IGNORE).sum(1).to(torch.float32)     # response tokens of each row
    sn = ctx.student.adapter.num_layers
    head = ctx.student.adapter.lm_head  # read .weight only after the forward: FSDP2 gathers it there

    if phase == "verbalize-teacher" or phase == "verbalize-student":
        layers = ctx.t_layers if phase == "verbalize-teacher" else ctx.s_layers
        feats = trained_call(batch, layers, index, backbone_grad=False)
        w = trained_side.adapter.lm_head.weight
        per_layer = {k: losses.chunked_ce(feats[k], w, targets, vocab, chunk) for k in layers}
        total = sum(per_layer.values())
        return total, {f"ce@{k}": v.detach() for k, v in per_layer.items()}

    if phase == "sft":
        feats = trained_call(batch, [sn], index, backbone_grad=True)
        return _with_scene(ctx, feats, per_row, losses.chunked_ce(feats[sn], head.weight, targets, vocab, chunk), {})

    teacher = _teacher_outputs(ctx, batch, index, item_ids, final_only=(phase == "kd"))
    if teacher["n"] != index.numel():
        raise RuntimeError(f"teacher has {teacher['n']} response tokens, student {index.numel()}: the two "
                           f"tokenisations of the responses differ")
    if phase == "kd":
        feats = trained_call(batch, [sn], index, backbone_grad=True)
        w_s = head.weight
        t = cfg.kd.temperature
        loss = losses.chunked_kl(feats[sn], w_s, teacher["final"], vocab, chunk, direction=cfg.kd.kl,
                                 temperature=t) * (t * t)
        logs = {"kl": loss.detach()}
        if cfg.kd.ce_weight:
            ce = losses.chunked_ce(feats[sn], w_s, targets, vocab, chunk)
            loss = loss + cfg.kd.ce_weight * ce
            logs["ce"] = ce.detach()
        return _with_scene(ctx, feats, per_row, loss, logs)

    # interact ------------------------------------------------------------------------------------------
    feats = trained_call(batch, [*ctx.s_layers, sn], index, backbone_grad=True)
    w_s = head.weight
    t_feats = teacher["layers"]
    t_s, t_l = len(ctx.s_layers), len(ctx.t_layers)
    mcfg = cfg.matching
    needs_kl = mcfg.strategy in ("multinomial", "bottom-k")
    lse = {}  # student layer i -> its per-token logsumexp, made by the candidate pass; saves a chosen pair's matmul
    if needs_kl:
        pairs = candidate_pairs(t_s, t_l, mcfg)
        sums, lse = losses.pairwise_kl([feats[k].detach() for k in ctx.s_layers], w_s, t_feats, vocab, pairs=pairs,
                                       chunk=chunk, direction=cfg.loss.kl, return_lse=True)
        finite = torch.isfinite(sums)
        # one all-reduce of the KL sums and the token count (on the loss device: NCCL needs CUDA tensors), then
        # the matching works on the CPU
        packed = torch.cat([torch.where(finite, sums, torch.zeros_like(sums)).reshape(-1).double(),
                            sums.new_tensor([float(index.numel())], dtype=torch.float64)])
        totals, finite = ctx.reduce_sum(packed).cpu(), finite.cpu()
        n_all = totals[-1].item()
        mean = totals[:-1].reshape(t_s, t_l) / max(n_all, 1.0)
        kl = torch.where(finite, mean, torch.full_like(mean, float("inf")))
        if n_all == 0:  # nothing to compare: every candidate ties
            kl = torch.where(finite, torch.zeros_like(kl), kl)
    else:
        kl = torch.full((t_s, t_l), float("inf"), dtype=torch.float64)
    result = match(kl, mcfg, matching_generator(cfg.train.seed, step_key), step=step_key)
    if ctx.matching_log is not None:
        ctx.matching_log.record(step_key // max(1, cfg.train.grad_accum), result)

    loss = w_s.new_zeros((), dtype=torch.float32)
    logs = {}
    for i, k in enumerate(ctx.s_layers):
        j = result.teacher_index[i]
        term = _pair_loss(cfg.loss.intermediate, feats[k], w_s, t_feats[j], targets, vocab, chunk, cfg.loss.kl,
                          student_lse=lse.get(i))
        if term is None:
            term = feats[k].sum() * 0.0  # keeps every verbalizer in the graph (DDP needs a grad for each)
        loss = loss + term
    last = _pair_loss(cfg.loss.last, feats[sn], w_s, teacher["final"], targets, vocab, chunk, cfg.loss.kl)
    if last is not None:
        loss = loss + last
        logs["last"] = last.detach()
    logs["matched"] = [ctx.t_layers[j] for j in result.teacher_index]
    return _with_scene(ctx, feats, per_row, loss, logs)


def _with_scene(ctx: Context, feats: dict, per_row: torch.Tensor, loss: torch.Tensor, logs: dict):
    """Add the scene-target loss when the batch had one: `aux_weight` x each row's error times the row's response
    tokens. The trainer divides by the step's response tokens, so the scene loss weighs `aux_weight` x its
    token-weighted mean (rows without a target count 0) against the per-token answer loss, and, being a sum over
    rows like that loss, splits over micro-batches and ranks exactly. Logged as `aux` and `main` (the loss without
    it), per token like `loss`. The image-token place target (`place`, weighed by `place_weight`) joins the same way."""
    total = loss
    for name, weight in (("aux", ctx.cfg.train.aux_weight), ("place", ctx.cfg.train.place_weight)):
        if name in feats:
            term = (feats[name] * per_row).sum()
            logs.update(main=loss.detach(), **{name: term.detach()})
            total = total + weight * term
    return total, logs


def _pair_loss(op: str, x_s, w_s, teacher, targets, vocab, chunk, direction, student_lse=None):
    """`student_lse`: logsumexp of x_s's logits when already known (a top-k teacher then skips the forward matmul)."""
    if op == "none":
        return None
    if op == "kld":
        return losses.chunked_kl(x_s, w_s, teacher, vocab, chunk, direction=direction, student_lse=student_lse)
    if op == "ce":
        return losses.chunked_ce(x_s, w_s, targets, vocab, chunk)
    if op == "l2":
        return losses.chunked_l2(x_s, w_s, teacher, vocab, chunk, student_lse=student_lse)
    raise ValueError(f"unknown loss op {op!r}")


def _teacher_outputs(ctx: Context, batch: dict, s_index: torch.Tensor, item_ids, final_only: bool) -> dict:
    """Teacher distributions on the response tokens: live (Dense features) or from the top-k cache (TopK)."""
    if ctx.teacher_cache is not None:
        batch.pop("teacher_batch", None)
        return ctx.teacher_cache.lookup(item_ids, ctx.t_layers, final_only)
    t_batch = batch.pop("teacher_batch")
    t_labels = t_batch.pop("labels")
    t_index, _ = losses.response_positions(t_labels)
    tn = ctx.teacher.adapter.num_layers
    w_t = ctx.teacher.adapter.lm_head.weight
    layers = [tn] if final_only else [*ctx.t_layers, tn]
    with torch.no_grad():
        feats = ctx.teacher(t_batch, layers, t_index, backbone_grad=False)
    out = {"n": t_index.numel(), "final": losses.Dense(feats[tn], w_t)}
    if not final_only:
        out["layers"] = [losses.Dense(feats[k], w_t) for k in ctx.t_layers]
    return out
