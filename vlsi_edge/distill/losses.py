"""Memory-lean vocabulary-space losses for VLsI (https://arxiv.org/abs/2412.01822, Sec. 3 and METHOD.md).

A verbalizer reads a layer's normed features x (N, D) through the frozen lm_head W: logits = x @ W[:V].T, where V is
the real tokenizer length (rows >= V are padding and may differ between teacher and student). With V ~ 150k an
(N, V) logit tensor is the largest thing in a step, so every loss here is a `torch.autograd.Function` that walks the
tokens in chunks: forward keeps only its inputs and a few numbers per token (logsumexp, rest-bucket log-prob, ...),
backward recomputes each chunk's logits. Nothing holds more than `chunk` rows of (., V) at a time (`pairwise_kl`
holds about t_s + 3 of them). All losses are SUMS over tokens in fp32 (fp64 for fp64 inputs); the caller divides by its
(possibly all-reduced) token count. Gradients reach x and W (when W requires grad), never the teacher.

    index, targets = response_positions(batch["labels"])               # (N,), (N,)
    x = final_norm(h + verb_ffn(h))                                    # (B, T, D), normal autograd
    xs = gather(x, index)                                              # (N, D)
    ce = chunked_ce(xs, lm_head.weight, targets, vocab=len(tokenizer)) / len(targets)
    kl = chunked_kl(xs, lm_head.weight, Dense(xt.detach(), teacher_head.weight), vocab=len(tokenizer)) / len(targets)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

IGNORE = -100  # same as vlsi_edge.data.collate.IGNORE; not imported so this file stays torch-only
Direction = Literal["forward", "reverse"]


@dataclass
class Dense:
    """A live teacher: its normed features and its (padded) lm_head weight; logits are made per chunk, no grad."""

    x: Tensor       # (N, D_t)
    weight: Tensor  # (V_t_padded, D_t)


@dataclass
class TopK:
    """A cached teacher: top-k log-probs over the vocabulary; the rest bucket holds 1 - sum(exp(logprobs)).

    `temperature` is the one the log-probs were computed at; losses refuse another (the rest bucket cannot be
    re-tempered)."""

    ids: Tensor       # (N, k) int64, distinct per row
    logprobs: Tensor  # (N, k) float32
    temperature: float = 1.0


# ------------------------------------------------------------------------------------------------ positions
def response_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Flat indices into B*T of positions whose next label is not IGNORE (row-major), and those labels."""
    t = labels.shape[1]
    nxt = labels[:, 1:]                                  # (B, T-1)
    rows, cols = (nxt != IGNORE).nonzero(as_tuple=True)  # row-major order
    return rows * t + cols, nxt[rows, cols].long()       # (N,), (N,)


def gather(h: Tensor, index: Tensor) -> Tensor:
    """(B, T, D) hidden states at flat positions `index` -> (N, D)."""
    return h.flatten(0, 1).index_select(0, index)


# ------------------------------------------------------------------------------------------------ public losses
def chunked_ce(x: Tensor, weight: Tensor, targets: Tensor, vocab: int, chunk: int = 1024,
               temperature: float = 1.0) -> Tensor:
    """Sum over tokens of cross-entropy of softmax(x @ weight[:vocab].T / temperature) against targets (N,)."""
    _check(x, weight, vocab, chunk)
    assert targets.shape == x.shape[:1], f"targets {tuple(targets.shape)} vs x {tuple(x.shape)}: expected (N,)"
    if targets.numel():
        lo, hi = int(targets.min()), int(targets.max())
        assert lo >= 0 and hi < vocab, f"target ids span [{lo}, {hi}], expected [0, {vocab}): wrong vocab or " \
                                       f"unmasked padding/IGNORE labels"
    spec = _Spec("ce", "none", vocab, chunk, float(temperature))
    return _VocabLoss.apply(x, weight, targets.long(), None, None, None, None, spec)


def chunked_kl(x: Tensor, weight: Tensor, teacher: Dense | TopK, vocab: int, chunk: int = 1024,
               direction: Direction = "forward", temperature: float = 1.0) -> Tensor:
    """Sum over tokens of KL(p_teacher || q_student) (forward) or KL(q || p) (reverse); temperature divides both
    sides' logits. A TopK teacher compares k + 1 buckets (its ids + rest) on both sides (METHOD.md, teacher cache)."""
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction {direction!r}: expected 'forward' or 'reverse'")
    if direction == "reverse" and isinstance(teacher, TopK):
        raise ValueError("reverse KL needs the full teacher distribution; a top-k teacher cannot give it "
                         "(use direction='forward' or a live Dense teacher)")
    op = "kl_fwd" if direction == "forward" else "kl_rev"
    return _teacher_loss(op, x, weight, teacher, vocab, chunk, float(temperature))


def chunked_l2(x: Tensor, weight: Tensor, teacher: Dense | TopK, vocab: int, chunk: int = 1024) -> Tensor:
    """Sum over tokens of ||p_teacher - q_student||^2 over the vocabulary (Dense) or the k + 1 buckets (TopK)."""
    return _teacher_loss("l2", x, weight, teacher, vocab, chunk, 1.0)


def pairwise_kl(student_x: list[Tensor], weight_s: Tensor, teacher: list[Dense | TopK], vocab: int,
                pairs: list[tuple[int, int]] | None = None, chunk: int = 1024,
                direction: Direction = "forward") -> Tensor:
    """No-grad (t_s, t_l) matrix of KL sums over tokens for each (student layer i, teacher layer j) in `pairs`
    (default: all), +inf elsewhere: the candidate matrix for layer matching (METHOD.md, step 2).

    Per chunk, every student layer's log-probs are made once and kept (t_s tensors of (chunk, V)); each teacher
    layer's are made once and reused for all its pairs, so peak memory is about (t_s + 3) * chunk * V floats
    (e.g. 10 * 256 * 152k * 4 B = 1.6 GB): lower `chunk` for many layers or a big vocabulary."""
    t_s, t_l = len(student_x), len(teacher)
    pairs = [(i, j) for i in range(t_s) for j in range(t_l)] if pairs is None else [tuple(p) for p in pairs]
    assert all(0 <= i < t_s and 0 <= j < t_l for i, j in pairs), f"pairs {pairs} outside ({t_s}, {t_l})"
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction {direction!r}: expected 'forward' or 'reverse'")
    if direction == "reverse" and any(isinstance(t, TopK) for t in teacher):
        raise ValueError("reverse KL needs the full teacher distribution; a top-k teacher cannot give it")
    n = student_x[0].shape[0] if student_x else 0
    for x in student_x:
        _check(x, weight_s, vocab, chunk)
        assert x.shape[0] == n, f"student layers have {x.shape[0]} vs {n} tokens"
    for t in teacher:
        _check_teacher(t, n, vocab, 1.0)
    acc = _acc_dtype(weight_s, *student_x)
    out = torch.full((t_s, t_l), float("inf"), dtype=acc, device=weight_s.device)
    if not pairs:
        return out
    sums = torch.zeros_like(out)
    by_teacher: dict[int, list[int]] = {}
    for i, j in pairs:
        by_teacher.setdefault(j, []).append(i)
    used = sorted({i for i, _ in pairs})
    op = "kl_fwd" if direction == "forward" else "kl_rev"
    with torch.no_grad(), torch.autocast(weight_s.device.type, enabled=False):
        w_s = weight_s[:vocab].to(acc)                                         # (V, D)
        w_t = {id(t.weight): t.weight[:vocab].to(acc) for t in teacher if isinstance(t, Dense)}  # shared heads
        teacher = [Dense(t.x, w_t[id(t.weight)]) if isinstance(t, Dense) else t for t in teacher]
        for lo, hi in _chunks(n, chunk):
            lq = {i: _log_softmax(student_x[i][lo:hi].to(acc) @ w_s.T)[0] for i in used}  # (c, V) each
            for j, students in by_teacher.items():
                tc = _teacher_chunk(teacher[j], lo, hi, vocab, 1.0, acc)
                for i in students:
                    sums[i, j] += _terms(op, lq[i], tc)[0].sum()
    rows, cols = zip(*pairs)
    out[list(rows), list(cols)] = sums[list(rows), list(cols)]
    return out


def topk_logprobs(x: Tensor, weight: Tensor, vocab: int, k: int, chunk: int = 1024,
                  temperature: float = 1.0) -> TopK:
    """The k most likely tokens of softmax(x @ weight[:vocab].T / temperature) per row, for a teacher cache."""
    _check(x, weight, vocab, chunk)
    assert 0 < k <= vocab, f"k = {k}: expected 1 .. vocab ({vocab})"
    acc = _acc_dtype(x, weight)
    ids = torch.empty(x.shape[0], k, dtype=torch.long, device=x.device)
    logprobs = torch.empty(x.shape[0], k, dtype=torch.float32, device=x.device)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        w = weight[:vocab].to(acc)                                             # (V, D)
        for lo, hi in _chunks(x.shape[0], chunk):
            lq, _ = _log_softmax(x[lo:hi].to(acc) @ w.T / temperature)        # (c, V)
            top = lq.topk(k, dim=-1)
            ids[lo:hi], logprobs[lo:hi] = top.indices, top.values.float()
    return TopK(ids, logprobs, float(temperature))


# ------------------------------------------------------------------------------------------------ internals
class _Spec(NamedTuple):
    op: str          # ce | kl_fwd | kl_rev | l2
    teacher: str     # none | dense | topk
    vocab: int
    chunk: int
    temperature: float


@dataclass
class _TChunk:
    """One chunk of a teacher: dense log-probs (c, V), or top-k ids/log-probs (c, k) with the rest bucket (c,)."""

    lp: Tensor | None = None
    ids: Tensor | None = None
    lpk: Tensor | None = None
    rest: Tensor | None = None
    log_rest: Tensor | None = None


def _check(x: Tensor, weight: Tensor, vocab: int, chunk: int) -> None:
    assert x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1], \
        f"x {tuple(x.shape)} and weight {tuple(weight.shape)}: expected (N, D) and (V_padded, D)"
    assert 0 < vocab <= weight.shape[0], f"vocab {vocab} > weight rows {weight.shape[0]}: wrong tokenizer length?"
    assert chunk > 0, f"chunk {chunk}: expected > 0"


def _check_teacher(teacher: Dense | TopK, n: int, vocab: int, temperature: float) -> None:
    if isinstance(teacher, Dense):
        _check(teacher.x, teacher.weight, vocab, 1)
        assert teacher.x.shape[0] == n, f"teacher has {teacher.x.shape[0]} tokens, student {n}"
        return
    assert isinstance(teacher, TopK), f"teacher {type(teacher).__name__}: expected Dense or TopK"
    assert teacher.ids.shape == teacher.logprobs.shape and teacher.ids.shape[0] == n, \
        f"top-k ids {tuple(teacher.ids.shape)} / logprobs {tuple(teacher.logprobs.shape)} vs {n} student tokens"
    if teacher.ids.numel():
        top = int(teacher.ids.max())
        assert top < vocab, f"top-k id {top} >= vocab {vocab}: cache built with another tokenizer length"
    if teacher.temperature != temperature:
        raise ValueError(f"top-k teacher was cached at temperature {teacher.temperature}, the loss asks for "
                         f"{temperature}: rebuild the cache with topk_logprobs(..., temperature={temperature})")


def _teacher_loss(op: str, x: Tensor, weight: Tensor, teacher: Dense | TopK, vocab: int, chunk: int,
                  temperature: float) -> Tensor:
    _check(x, weight, vocab, chunk)
    _check_teacher(teacher, x.shape[0], vocab, temperature)
    if isinstance(teacher, Dense):
        spec = _Spec(op, "dense", vocab, chunk, temperature)
        return _VocabLoss.apply(x, weight, None, teacher.x.detach(), teacher.weight.detach(), None, None, spec)
    spec = _Spec(op, "topk", vocab, chunk, temperature)  # the cached log-probs are already at it
    return _VocabLoss.apply(x, weight, None, None, None, teacher.ids.long(), teacher.logprobs.detach(), spec)


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 (gradcheck)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _chunks(n: int, chunk: int):
    for lo in range(0, n, chunk):
        yield lo, min(lo + chunk, n)


def _log_softmax(s: Tensor) -> tuple[Tensor, Tensor]:
    lse = s.logsumexp(-1)                  # (c,)
    return s - lse[:, None], lse           # (c, V), (c,)


def _rest(lpk: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """Teacher rest bucket: 1 - sum(exp(top-k)) clamped to [0, 1]; exactly 0 when the ids cover the vocab."""
    if lpk.shape[-1] >= vocab:
        rest = lpk.new_zeros(lpk.shape[:1])
    else:
        rest = (1 - lpk.exp().sum(-1)).clamp(0, 1)
    return rest, rest.log()                # (c,), (c,) (-inf where 0)


def _teacher_chunk(teacher: Dense | TopK, lo: int, hi: int, vocab: int, temperature: float,
                   acc: torch.dtype) -> _TChunk:
    """A Dense teacher's weight must already be weight[:vocab] in `acc` (made once per call, not per chunk)."""
    if isinstance(teacher, Dense):
        lp, _ = _log_softmax(teacher.x[lo:hi].to(acc) @ teacher.weight.T / temperature)  # (c, V)
        return _TChunk(lp=lp)
    lpk = teacher.logprobs[lo:hi].to(acc)                                      # (c, k)
    rest, log_rest = _rest(lpk, vocab)
    return _TChunk(ids=teacher.ids[lo:hi], lpk=lpk, rest=rest, log_rest=log_rest)


def _student_rest(lq: Tensor, ids: Tensor) -> Tensor:
    """log of the student's mass outside `ids`, from the logits (no 1 - sum cancellation); -inf if none left."""
    return lq.scatter(1, ids, float("-inf")).logsumexp(-1)                    # (c,)


def _plogr(p: Tensor, lp: Tensor, lq: Tensor) -> Tensor:
    """p * (lp - lq) with 0 * log 0 = 0."""
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))


def _terms(op: str, lq: Tensor, t: _TChunk) -> tuple[Tensor, Tensor]:
    """Per-token loss (c,) and one saved stat per token (c,) for backward, from student log-probs lq (c, V)."""
    if t.lp is not None:
        if op == "kl_fwd":
            terms = _plogr(t.lp.exp(), t.lp, lq).sum(-1)
        elif op == "kl_rev":
            terms = _plogr(lq.exp(), lq, t.lp).sum(-1)
        else:
            terms = (t.lp.exp() - lq.exp()).square().sum(-1)
        return terms, terms
    lqk, lqr = lq.gather(1, t.ids), _student_rest(lq, t.ids)                  # (c, k), (c,)
    if op == "kl_fwd":
        terms = _plogr(t.lpk.exp(), t.lpk, lqk).sum(-1) + _plogr(t.rest, t.log_rest, lqr)
    else:
        terms = (t.lpk.exp() - lqk.exp()).square().sum(-1) + (t.rest - lqr.exp()).square()
    return terms, lqr


def _grad_logits(op: str, lq: Tensor, q: Tensor, t: _TChunk | None, targets: Tensor | None,
                 stat: Tensor) -> Tensor:
    """d(sum of per-token losses) / d(student logits / temperature), (c, V)."""
    if op == "ce":
        return q.scatter_add(1, targets[:, None], -torch.ones_like(q[:, :1]))
    if t.lp is not None:
        p = t.lp.exp()
        if op == "kl_fwd":
            return q - p
        if op == "kl_rev":  # stat = per-token KL
            return torch.where(q > 0, q * (lq - t.lp - stat[:, None]), torch.zeros_like(q))
        a = 2 * (q - p)
        return q * (a - (q * a).sum(-1, keepdim=True))
    lqr = stat                                                                  # (c,)
    lqr_safe = torch.where(torch.isfinite(lqr), lqr, torch.zeros_like(lqr))
    if op == "kl_fwd":
        pk = t.lpk.exp()                                                        # (c, k)
        mass = pk.sum(-1) + t.rest                                              # (c,)
        in_rest = (lq.scatter(1, t.ids, float("-inf")) - lqr_safe[:, None]).exp()  # q_v / q_rest off the ids
        g = q * mass[:, None] - t.rest[:, None] * in_rest
        return g.scatter_add(1, t.ids, -pk)
    qk, qr = lq.gather(1, t.ids).exp(), lqr.exp()
    ak, ar = 2 * (qk - t.lpk.exp()), 2 * (qr - t.rest)                          # dL/dq per bucket
    a = ar[:, None].expand_as(q).scatter(1, t.ids, ak)                          # bucket's dL/dq for each v
    return q * (a - ((ak * qk).sum(-1) + ar * qr)[:, None])


class _VocabLoss(torch.autograd.Function):
    """Sum over tokens of a vocabulary-space loss, chunked over tokens in forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, targets, t_x, t_w, t_ids, t_lp, spec: _Spec):
        acc = _acc_dtype(x, weight)
        n = x.shape[0]
        stats = torch.zeros(n, 2, dtype=acc, device=x.device)                  # (N, 2): lse, op stat
        total = torch.zeros((), dtype=acc, device=x.device)
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            w = weight[:spec.vocab].to(acc)                                     # (V, D)
            teacher = _teacher_of(spec, t_x, t_w, t_ids, t_lp, acc)
            for lo, hi in _chunks(n, spec.chunk):
                s = x[lo:hi].to(acc) @ w.T / spec.temperature                   # (c, V)
                lq, lse = _log_softmax(s)
                if spec.op == "ce":
                    terms = lse - s.gather(1, targets[lo:hi, None]).squeeze(1)
                    stat = terms
                else:
                    tc = _teacher_chunk(teacher, lo, hi, spec.vocab, spec.temperature, acc)
                    terms, stat = _terms(spec.op, lq, tc)
                stats[lo:hi, 0], stats[lo:hi, 1] = lse, stat
                total += terms.sum()
        ctx.spec = spec
        ctx.save_for_backward(x, weight, targets, t_x, t_w, t_ids, t_lp, stats)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, targets, t_x, t_w, t_ids, t_lp, stats = ctx.saved_tensors
        spec: _Spec = ctx.spec
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = stats.dtype
        gx = torch.zeros_like(x) if need_x else None                            # (N, D)
        gw = torch.zeros(spec.vocab, weight.shape[1], dtype=acc, device=weight.device) if need_w else None
        with torch.autocast(x.device.type, enabled=False):
            w = weight[:spec.vocab].to(acc)                                     # (V, D)
            teacher = _teacher_of(spec, t_x, t_w, t_ids, t_lp, acc)
            scale = grad_out.to(acc) / spec.temperature
            for lo, hi in _chunks(x.shape[0], spec.chunk):
                xc = x[lo:hi].to(acc)                                           # (c, D)
                lq = xc @ w.T / spec.temperature - stats[lo:hi, :1]             # (c, V)
                tc = None if spec.op == "ce" else \
                    _teacher_chunk(teacher, lo, hi, spec.vocab, spec.temperature, acc)
                y = targets[lo:hi] if targets is not None else None
                g = _grad_logits(spec.op, lq, lq.exp(), tc, y, stats[lo:hi, 1]) * scale  # d loss / d logits
                if need_x:
                    gx[lo:hi] = (g @ w).to(x.dtype)
                if need_w:
                    gw.addmm_(g.T, xc)
        if need_w:
            full = torch.zeros_like(weight)
            full[:spec.vocab] = gw.to(weight.dtype)
            gw = full
        return gx, gw, None, None, None, None, None, None


def _teacher_of(spec: _Spec, t_x, t_w, t_ids, t_lp, acc: torch.dtype) -> Dense | TopK | None:
    if spec.teacher == "dense":
        return Dense(t_x, t_w[:spec.vocab].to(acc))                             # (N, D_t), (V, D_t)
    if spec.teacher == "topk":
        return TopK(t_ids, t_lp)
    return None
