"""Memory-lean vocabulary-space losses for VLsI (https://arxiv.org/abs/2412.01822, Sec. 3 and METHOD.md).

A verbalizer reads a layer's normed features x (N, D) through the frozen lm_head W: logits = x @ W[:V].T, where V is
the real tokenizer length (rows >= V are padding and may differ between teacher and student). With V ~ 150k an
(N, V) logit tensor is the largest thing in a step, so every loss here is a `torch.autograd.Function` that walks the
tokens in chunks: forward keeps only its inputs and a few numbers per token (logsumexp, rest-bucket log-prob, ...),
backward recomputes each chunk's logits. Nothing holds more than `chunk` rows of (., V) at a time (`pairwise_kl`
holds about t_s + 3 of them with live teachers, 2 with top-k ones). All losses are SUMS over tokens in fp32 (fp64 for
fp64 inputs); the caller divides by its (possibly all-reduced) token count. Gradients reach x and W (when W requires
grad), never the teacher.

    index, targets = response_positions(batch["labels"])               # (N,), (N,)
    x = final_norm(h + verb_ffn(h))                                    # (B, T, D), normal autograd
    xs = gather(x, index)                                              # (N, D)
    ce = chunked_ce(xs, lm_head.weight, targets, vocab=len(tokenizer)) / len(targets)
    kl = chunked_kl(xs, lm_head.weight, Dense(xt.detach(), teacher_head.weight), vocab=len(tokenizer)) / len(targets)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

IGNORE = -100  # same as vlsi_edge.data.collate.IGNORE; not imported so this file stays torch-only
Direction = Literal["forward", "reverse"]
EXACT_REST_ABOVE = 0.5  # student mass at a top-k teacher's ids above which log(1 - sum q_k) loses digits


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
    return _VocabLoss.apply(x, weight, targets.long(), None, None, None, None, None, spec)


def chunked_kl(x: Tensor, weight: Tensor, teacher: Dense | TopK, vocab: int, chunk: int = 1024,
               direction: Direction = "forward", temperature: float = 1.0, student_lse: Tensor | None = None) -> Tensor:
    """Sum over tokens of KL(p_teacher || q_student) (forward) or KL(q || p) (reverse); temperature divides both
    sides' logits. A TopK teacher compares k + 1 buckets (its ids + rest) on both sides (METHOD.md, teacher cache).

    `student_lse` (N,), optional, no grad: logsumexp(x @ weight[:vocab].T / temperature) per token, when the caller
    already has it (`pairwise_kl(..., return_lse=True)`). With a TopK teacher the forward then needs only the logits at
    the k ids (O(N k D), no (N, V) matmul); the loss and the gradients are the same. A Dense teacher ignores it."""
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction {direction!r}: expected 'forward' or 'reverse'")
    if direction == "reverse" and isinstance(teacher, TopK):
        raise ValueError("reverse KL needs the full teacher distribution; a top-k teacher cannot give it "
                         "(use direction='forward' or a live Dense teacher)")
    op = "kl_fwd" if direction == "forward" else "kl_rev"
    return _teacher_loss(op, x, weight, teacher, vocab, chunk, float(temperature), student_lse)


def chunked_l2(x: Tensor, weight: Tensor, teacher: Dense | TopK, vocab: int, chunk: int = 1024,
               student_lse: Tensor | None = None) -> Tensor:
    """Sum over tokens of ||p_teacher - q_student||^2 over the vocabulary (Dense) or the k + 1 buckets (TopK);
    `student_lse` as in `chunked_kl`."""
    return _teacher_loss("l2", x, weight, teacher, vocab, chunk, 1.0, student_lse)


def pairwise_kl(student_x: list[Tensor], weight_s: Tensor, teacher: list[Dense | TopK], vocab: int,
                pairs: list[tuple[int, int]] | None = None, chunk: int = 1024,
                direction: Direction = "forward", return_lse: bool = False) -> Tensor | tuple[Tensor, dict]:
    """No-grad (t_s, t_l) matrix of KL sums over tokens for each (student layer i, teacher layer j) in `pairs`
    (default: all), +inf elsewhere: the candidate matrix for layer matching (METHOD.md, step 2).

    Per chunk, every student layer's logits are made once: one (chunk, V) matmul + logsumexp. A TopK teacher's pair
    then costs O(chunk k) (the student's log-probs at its ids and the rest bucket), read off the logits before the next
    student layer's; with a Dense teacher the student log-probs are kept (t_s tensors of (chunk, V)) and each teacher
    layer's are made once and reused for all its pairs, so peak memory is about (t_s + 3) * chunk * V floats
    (e.g. 10 * 256 * 152k * 4 B = 1.6 GB): lower `chunk` for many layers or a big vocabulary.

    `return_lse=True` returns `(matrix, {i: lse (N,)})` with each paired student layer's logsumexp(x_i @ W[:V].T):
    what `chunked_kl(..., student_lse=...)` takes for the chosen pairs."""
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
    used = sorted({i for i, _ in pairs})
    lses = {i: torch.empty(n, dtype=acc, device=weight_s.device) for i in used}
    if not pairs:
        return (out, lses) if return_lse else out
    sums = torch.zeros_like(out)
    dense_of: dict[int, list[int]] = {}   # dense teacher j -> its students
    topk_of: dict[int, list[int]] = {}    # student i -> its top-k teachers
    for i, j in pairs:
        if isinstance(teacher[j], Dense):
            dense_of.setdefault(j, []).append(i)
        else:
            topk_of.setdefault(i, []).append(j)
    keep = {i for students in dense_of.values() for i in students}
    op = "kl_fwd" if direction == "forward" else "kl_rev"
    with torch.no_grad(), torch.autocast(weight_s.device.type, enabled=False):
        w_s = weight_s[:vocab].to(acc)                                         # (V, D)
        w_t = {id(t.weight): t.weight[:vocab].to(acc) for t in teacher if isinstance(t, Dense)}  # shared heads
        teacher = [Dense(t.x, w_t[id(t.weight)]) if isinstance(t, Dense) else t for t in teacher]
        c0 = min(chunk, n)
        s_buf = weight_s.new_empty((c0, vocab), dtype=acc)                     # reused by layers not kept
        scratch = weight_s.new_empty((c0, vocab), dtype=acc)
        for lo, hi in _chunks(n, chunk):
            lq: dict[int, Tensor] = {}
            tk: dict[int, _TChunk] = {}
            for i in used:
                xc = student_x[i][lo:hi].to(acc)
                s = xc @ w_s.T if i in keep else torch.mm(xc, w_s.T, out=s_buf[:hi - lo])  # (c, V)
                lse = _lse(s, scratch)                                         # (c,)
                lses[i][lo:hi] = lse
                for j in topk_of.get(i, ()):
                    if j not in tk:
                        tk[j] = _teacher_chunk(teacher[j], lo, hi, vocab, 1.0, acc)
                    tc = tk[j]
                    lqk = s.gather(1, tc.ids) - lse[:, None]                   # (c, k)
                    lqr = _student_rest(lqk, vocab, lambda r, s=s, lse=lse, ids=tc.ids: _masked_lse(s[r], ids[r])
                                        - lse[r])
                    sums[i, j] += _topk_terms(op, lqk, lqr, tc).sum()
                if i in keep:
                    lq[i] = s.sub_(lse[:, None])                               # (c, V) log-probs
            for j, students in dense_of.items():
                tc = _teacher_chunk(teacher[j], lo, hi, vocab, 1.0, acc)
                for i in students:
                    sums[i, j] += _dense_terms(op, lq[i], tc)[0].sum()
    rows, cols = zip(*pairs)
    out[list(rows), list(cols)] = sums[list(rows), list(cols)]
    return (out, lses) if return_lse else out


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
                  temperature: float, student_lse: Tensor | None = None) -> Tensor:
    _check(x, weight, vocab, chunk)
    _check_teacher(teacher, x.shape[0], vocab, temperature)
    if isinstance(teacher, Dense):  # its loss needs the full student log-probs anyway: student_lse is of no use
        spec = _Spec(op, "dense", vocab, chunk, temperature)
        return _VocabLoss.apply(x, weight, None, teacher.x.detach(), teacher.weight.detach(), None, None, None, spec)
    if student_lse is not None:
        assert student_lse.shape == x.shape[:1], \
            f"student_lse {tuple(student_lse.shape)} vs x {tuple(x.shape)}: expected (N,)"
        student_lse = student_lse.detach()
    spec = _Spec(op, "topk", vocab, chunk, temperature)  # the cached log-probs are already at it
    return _VocabLoss.apply(x, weight, None, None, None, teacher.ids.long(), teacher.logprobs.detach(), student_lse,
                            spec)


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 (gradcheck)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _chunks(n: int, chunk: int):
    for lo in range(0, n, chunk):
        yield lo, min(lo + chunk, n)


def _lse(s: Tensor, scratch: Tensor | None = None) -> Tensor:
    """logsumexp over the last dim of s (c, V), leaving s intact; `scratch` (>= c, V), if given, takes the exp (a
    fresh (c, V) allocation costs page faults comparable to the exp itself)."""
    m = s.amax(-1)                                                             # (c,)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.sub(s, m[:, None], out=scratch[:s.shape[0]]) if scratch is not None else s - m[:, None]
    return e.exp_().sum(-1).log_().add_(m)


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


def _masked_lse(s: Tensor, ids: Tensor) -> Tensor:
    """logsumexp of each row of s (r, V) leaving out the columns `ids` (r, k); -inf if none left."""
    return s.scatter(1, ids, float("-inf")).logsumexp(-1)                     # (r,)


def _student_rest(lqk: Tensor, vocab: int, exact) -> Tensor:
    """log of the student's mass outside the teacher's ids, from its log-probs at them lqk (c, k): log(1 - sum q_k).

    1 - sum q_k cancels when sum q_k is near 1 (relative error ~ eps * sum / rest): rows with sum q_k > EXACT_REST_ABOVE
    take `exact(rows)` instead, the masked logsumexp of their full logits. -inf when the ids cover the vocabulary."""
    if lqk.shape[-1] >= vocab:
        return lqk.new_full(lqk.shape[:1], float("-inf"))
    a = lqk.logsumexp(-1)                                                      # (c,) log sum q_k
    lqr = torch.log1p(-a.exp())                                                # exact to ~eps while sum q_k <= 1/2
    far = a > math.log(EXACT_REST_ABOVE)
    if far.any():
        rows = far.nonzero().squeeze(1)
        lqr[rows] = exact(rows).to(lqr.dtype)
    return lqr


def _logits_at(x: Tensor, w: Tensor, ids: Tensor, temperature: float, budget: int) -> Tensor:
    """x (c, D) times the rows of w (V, D) at ids (c, k) -> (c, k), in row blocks of <= `budget` gathered floats."""
    c, k = ids.shape
    out = x.new_empty(c, k)
    step = max(1, budget // max(1, k * w.shape[1]))
    for lo in range(0, c, step):
        hi = min(c, lo + step)
        out[lo:hi] = torch.bmm(w[ids[lo:hi]], x[lo:hi, :, None]).squeeze(-1)  # (b, k, D) @ (b, D, 1)
    return out / temperature if temperature != 1.0 else out


def _plogr(p: Tensor, lp: Tensor, lq: Tensor) -> Tensor:
    """p * (lp - lq) with 0 * log 0 = 0."""
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))


def _dense_terms(op: str, lq: Tensor, t: _TChunk) -> tuple[Tensor, Tensor]:
    """Per-token loss (c,) and one saved stat per token (c,) for backward, from student log-probs lq (c, V)."""
    if op == "kl_fwd":
        terms = _plogr(t.lp.exp(), t.lp, lq).sum(-1)
    elif op == "kl_rev":
        terms = _plogr(lq.exp(), lq, t.lp).sum(-1)
    else:
        terms = (t.lp.exp() - lq.exp()).square().sum(-1)
    return terms, terms


def _topk_terms(op: str, lqk: Tensor, lqr: Tensor, t: _TChunk) -> Tensor:
    """Per-token loss (c,) over the k + 1 buckets, from the student's log-probs at the ids (c, k) and rest (c,)."""
    if op == "kl_fwd":
        return _plogr(t.lpk.exp(), t.lpk, lqk).sum(-1) + _plogr(t.rest, t.log_rest, lqr)
    return (t.lpk.exp() - lqk.exp()).square().sum(-1) + (t.rest - lqr.exp()).square()


_RATIO_MAX = 1e30  # teacher rest / student rest above which q_v * ratio is done in the log domain (rows of g)


def _grad_logits(op: str, lq: Tensor, t: _TChunk | None, targets: Tensor | None, stat: Tensor,
                 scale: Tensor) -> Tensor:
    """scale * d(sum of per-token losses) / d(student logits / temperature), (c, V). Overwrites lq (c, V)."""
    if op == "ce":
        return lq.exp_().scatter_add_(1, targets[:, None], -torch.ones_like(lq[:, :1])).mul_(scale)
    if t.lp is not None:
        p = t.lp.exp()
        if op == "kl_fwd":
            return lq.exp_().sub_(p).mul_(scale)
        q = lq.exp()
        if op == "kl_rev":  # stat = per-token KL
            return torch.where(q > 0, q * (lq - t.lp - stat[:, None]), torch.zeros_like(q)).mul_(scale)
        a = 2 * (q - p)
        return q.mul_(a - (q * a).sum(-1, keepdim=True)).mul_(scale)
    # top-k: every column off the ids has the same dL/dq, so g = q * (per-row factor) plus one scatter at the ids
    lqr = stat                                                                  # (c,) student rest, log
    qk, pk = lq.gather(1, t.ids).exp(), t.lpk.exp()                             # (c, k), (c, k)
    if op == "kl_fwd":
        # dL/dz_v = q_v * (mass - r / q_r) off the ids, q_k * mass - p_k at them
        mass = pk.sum(-1) + t.rest                                              # (c,)
        ratio = torch.where(t.rest > 0, (t.log_rest - lqr).exp(), torch.zeros_like(lqr))  # r / q_r, 0 where r = 0
        big = ratio > _RATIO_MAX   # q_r underflows relative to r: q_v * ratio would overflow; q_v / q_r in logs
        fix = None
        if big.any():
            rows = big.nonzero().squeeze(1)
            lqr_safe = torch.where(torch.isfinite(lqr[rows]), lqr[rows], torch.zeros_like(lqr[rows]))
            fix = t.rest[rows, None] * (_scatter_inf(lq[rows], t.ids[rows]) - lqr_safe[:, None]).exp()
            ratio = ratio.masked_fill(big, 0.0)
        g = lq.exp_().mul_(((mass - ratio) * scale)[:, None])
        if fix is not None:
            g.index_add_(0, rows, fix.mul_(-scale))
        return g.scatter_(1, t.ids, (qk * mass[:, None] - pk) * scale)
    qr = lqr.exp()
    ak, ar = 2 * (qk - pk), 2 * (qr - t.rest)                                   # dL/dq per bucket
    c = (ak * qk).sum(-1) + ar * qr                                             # (c,) sum_v q_v dL/dq_v
    g = lq.exp_().mul_(((ar - c) * scale)[:, None])
    return g.scatter_(1, t.ids, qk * (ak - c[:, None]) * scale)


def _scatter_inf(s: Tensor, ids: Tensor) -> Tensor:
    return s.scatter(1, ids, float("-inf"))


class _VocabLoss(torch.autograd.Function):
    """Sum over tokens of a vocabulary-space loss, chunked over tokens in forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, targets, t_x, t_w, t_ids, t_lp, s_lse, spec: _Spec):
        acc = _acc_dtype(x, weight)
        n = x.shape[0]
        stats = torch.zeros(n, 2, dtype=acc, device=x.device)                  # (N, 2): lse, op stat
        total = torch.zeros((), dtype=acc, device=x.device)
        temp = spec.temperature
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            w = weight[:spec.vocab].to(acc)                                     # (V, D)
            teacher = _teacher_of(spec, t_x, t_w, t_ids, t_lp, acc)
            full = s_lse is None
            s_buf = x.new_empty((min(n, spec.chunk), spec.vocab), dtype=acc) if full else None
            scratch = x.new_empty((min(n, spec.chunk), spec.vocab), dtype=acc) if full else None
            for lo, hi in _chunks(n, spec.chunk):
                xc = x[lo:hi].to(acc)                                           # (c, D)
                s = None
                if full:
                    s = torch.mm(xc, w.T, out=s_buf[:hi - lo])                  # (c, V)
                    if temp != 1.0:
                        s.div_(temp)
                    lse = _lse(s, scratch)                                      # (c,)
                else:                                                           # top-k teacher: no (c, V) matmul
                    lse = s_lse[lo:hi].to(acc)
                if spec.op == "ce":
                    terms = lse - s.gather(1, targets[lo:hi, None]).squeeze(1)
                    stat = terms
                elif spec.teacher == "topk":
                    tc = _teacher_chunk(teacher, lo, hi, spec.vocab, temp, acc)
                    # logits at the ids by a gather-matmul on both paths, so student_lse changes nothing
                    lqk = _logits_at(xc, w, tc.ids, temp, (hi - lo) * spec.vocab) - lse[:, None]  # (c, k)

                    def exact(r, s=s, xc=xc, ids=tc.ids, lse=lse):
                        sr = s[r] if s is not None else (xc[r] @ w.T) / temp   # (r, V)
                        return _masked_lse(sr, ids[r]) - lse[r]

                    stat = _student_rest(lqk, spec.vocab, exact)                # (c,)
                    terms = _topk_terms(spec.op, lqk, stat, tc)
                else:
                    tc = _teacher_chunk(teacher, lo, hi, spec.vocab, temp, acc)
                    terms, stat = _dense_terms(spec.op, s.sub_(lse[:, None]), tc)
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
            buf = x.new_empty((min(x.shape[0], spec.chunk), spec.vocab), dtype=acc)  # each chunk's logits, then g
            for lo, hi in _chunks(x.shape[0], spec.chunk):
                xc = x[lo:hi].to(acc)                                           # (c, D)
                lq = torch.addmm(stats[lo:hi, :1].neg(), xc, w.T, alpha=1.0 / spec.temperature,
                                 out=buf[:hi - lo])                             # (c, V) log-probs
                tc = None if spec.op == "ce" else \
                    _teacher_chunk(teacher, lo, hi, spec.vocab, spec.temperature, acc)
                y = targets[lo:hi] if targets is not None else None
                g = _grad_logits(spec.op, lq, tc, y, stats[lo:hi, 1], scale)   # d loss / d logits, (c, V)
                if need_x:
                    gx[lo:hi] = (g @ w).to(x.dtype)
                if need_w:
                    gw.addmm_(g.T, xc)
        if need_w:
            full = torch.zeros_like(weight)
            full[:spec.vocab] = gw.to(weight.dtype)
            gw = full
        return gx, gw, None, None, None, None, None, None, None


def _teacher_of(spec: _Spec, t_x, t_w, t_ids, t_lp, acc: torch.dtype) -> Dense | TopK | None:
    if spec.teacher == "dense":
        return Dense(t_x, t_w[:spec.vocab].to(acc))                             # (N, D_t), (V, D_t)
    if spec.teacher == "topk":
        return TopK(t_ids, t_lp)
    return None
