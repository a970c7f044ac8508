"""Chunked vocabulary-space losses vs naive dense twins: values, gradients, memory, edge cases."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vlsi_edge.distill.losses import (
    Dense,
    TopK,
    chunked_ce,
    chunked_kl,
    chunked_l2,
    gather,
    pairwise_kl,
    response_positions,
    topk_logprobs,
)

N, D, DT, V, VPAD, VTPAD, CHUNK = 37, 16, 24, 50, 64, 56, 8


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(N, D, generator=g),
        "w": torch.randn(VPAD, D, generator=g) * 0.5,
        "xt": torch.randn(N, DT, generator=g),
        "wt": torch.randn(VTPAD, DT, generator=g) * 0.5,
        "y": torch.randint(0, V, (N,), generator=g),
    }


# ------------------------------------------------------------------------------------------------ naive twins
def _lq(x, w, t=1.0, v=V):
    return F.log_softmax(x @ w[:v].T / t, -1)  # (N, V)


def naive_ce(x, w, y, t=1.0):
    return F.cross_entropy(x @ w[:V].T / t, y, reduction="sum")


def naive_dense(op, x, w, xt, wt, t=1.0):
    lq, lp = _lq(x, w, t), _lq(xt, wt, t)
    if op == "kl_fwd":
        return (lp.exp() * (lp - lq)).sum()
    if op == "kl_rev":
        return (lq.exp() * (lq - lp)).sum()
    return (lp.exp() - lq.exp()).square().sum()


def naive_topk(op, x, w, xt, wt, k, t=1.0):
    """Teacher top-k + rest, student gathered at the same ids + its own rest, all from full softmaxes."""
    lp = _lq(xt, wt, t)
    lpk, ids = lp.topk(k, -1)
    pk = lpk.exp()
    pr = (1 - pk.sum(-1)).clamp(min=0)
    qk = _lq(x, w, t).exp().gather(1, ids)
    qr = 1 - qk.sum(-1)
    if op == "kl_fwd":
        return (pk * (lpk - qk.log())).sum() + (pr * (pr.log() - qr.log())).sum()
    return (pk - qk).square().sum() + (pr - qr).square().sum()


def _run(fn, case, w_grad=True):
    x = case["x"].clone().requires_grad_()
    w = case["w"].clone().requires_grad_(w_grad)
    loss = fn(x, w)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def _assert_same(fast, slow, case, w_grad=True):
    a, b = _run(fast, case, w_grad), _run(slow, case, w_grad)
    for got, want in zip(a, b):
        if want is None:
            assert got is None
        else:  # fp32 on both sides: absolute tolerance scaled by the tensor's magnitude
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("t", [1.0, 2.5])
def test_ce_matches_naive(case, t):
    _assert_same(lambda x, w: chunked_ce(x, w, case["y"], V, CHUNK, temperature=t),
                 lambda x, w: naive_ce(x, w, case["y"], t), case)


@pytest.mark.parametrize("op,t", [("kl_fwd", 1.0), ("kl_fwd", 2.5), ("kl_rev", 1.0), ("kl_rev", 0.7), ("l2", 1.0)])
def test_dense_teacher_matches_naive(case, op, t):
    teacher = Dense(case["xt"], case["wt"])

    def fast(x, w):
        if op == "l2":
            return chunked_l2(x, w, teacher, V, CHUNK)
        return chunked_kl(x, w, teacher, V, CHUNK, direction="forward" if op == "kl_fwd" else "reverse",
                          temperature=t)

    _assert_same(fast, lambda x, w: naive_dense(op, x, w, case["xt"], case["wt"], t), case)


@pytest.mark.parametrize("op,t,k", [("kl_fwd", 1.0, 5), ("kl_fwd", 2.0, 3), ("l2", 1.0, 5), ("kl_fwd", 1.0, 1)])
def test_topk_teacher_matches_naive_topk_plus_rest(case, op, t, k):
    cache = topk_logprobs(case["xt"], case["wt"], V, k, chunk=CHUNK, temperature=t)
    fn = (lambda x, w: chunked_kl(x, w, cache, V, CHUNK, temperature=t)) if op == "kl_fwd" else \
        (lambda x, w: chunked_l2(x, w, cache, V, CHUNK))
    _assert_same(fn, lambda x, w: naive_topk(op, x, w, case["xt"], case["wt"], k, t), case)


@pytest.mark.parametrize("op", ["kl_fwd", "l2"])
def test_topk_with_k_equal_vocab_is_the_dense_loss(case, op):
    dense, full = Dense(case["xt"], case["wt"]), topk_logprobs(case["xt"], case["wt"], V, V, chunk=CHUNK)
    loss = chunked_kl if op == "kl_fwd" else chunked_l2
    _assert_same(lambda x, w: loss(x, w, full, V, CHUNK), lambda x, w: loss(x, w, dense, V, CHUNK), case)


def test_frozen_weight_gets_no_grad(case):
    teacher = Dense(case["xt"], case["wt"])
    _assert_same(lambda x, w: chunked_kl(x, w, teacher, V, CHUNK),
                 lambda x, w: naive_dense("kl_fwd", x, w, case["xt"], case["wt"]), case, w_grad=False)
    xt = case["xt"].clone().requires_grad_()
    chunked_kl(case["x"].clone().requires_grad_(), case["w"], Dense(xt, case["wt"]), V, CHUNK).backward()
    assert xt.grad is None  # never to the teacher side


def test_topk_logprobs_matches_torch_topk(case):
    cache = topk_logprobs(case["xt"], case["wt"], V, 7, chunk=CHUNK)
    values, ids = _lq(case["xt"], case["wt"]).topk(7, -1)
    assert cache.ids.dtype == torch.int64 and cache.logprobs.dtype == torch.float32
    torch.testing.assert_close(cache.ids, ids)
    torch.testing.assert_close(cache.logprobs, values)


def test_bf16_inputs_accumulate_in_fp32(case):
    x, w = case["x"].bfloat16().requires_grad_(), case["w"].bfloat16().requires_grad_()
    loss = chunked_kl(x, w, Dense(case["xt"].bfloat16(), case["wt"].bfloat16()), V, CHUNK)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == w.grad.dtype == torch.bfloat16
    ref = chunked_kl(x.detach().float(), w.detach().float(),
                     Dense(case["xt"].bfloat16().float(), case["wt"].bfloat16().float()), V, CHUNK)
    torch.testing.assert_close(loss.detach(), ref)


def test_autocast_does_not_lower_precision(case):
    x, teacher = case["x"].clone().requires_grad_(), Dense(case["xt"], case["wt"])
    ref = chunked_kl(x, case["w"], teacher, V, CHUNK)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_kl(x, case["w"], teacher, V, CHUNK)
    assert torch.equal(got, ref)


# ------------------------------------------------------------------------------------------------ edge cases
def test_all_masked_batch_is_a_connected_zero(case):
    x = torch.zeros(0, D, requires_grad=True)
    w = case["w"].clone().requires_grad_()
    empty_t = Dense(torch.zeros(0, DT), case["wt"])
    empty_k = TopK(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4))
    losses = [chunked_ce(x, w, torch.zeros(0, dtype=torch.long), V, CHUNK), chunked_kl(x, w, empty_t, V, CHUNK),
              chunked_kl(x, w, empty_t, V, CHUNK, direction="reverse"), chunked_l2(x, w, empty_k, V, CHUNK),
              chunked_kl(x, w, empty_k, V, CHUNK)]
    for loss in losses:
        assert loss.grad_fn is not None and loss.item() == 0.0
    sum(losses).backward()
    assert x.grad.shape == (0, D) and torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(pairwise_kl([x], w, [empty_t], V, chunk=CHUNK), torch.zeros(1, 1))


def test_no_nan_when_probabilities_underflow(case):
    x = (case["x"] * 200).requires_grad_()  # near one-hot softmaxes on both sides: exp underflows to 0
    teacher = Dense(case["xt"] * 200, case["wt"])
    cache = topk_logprobs(teacher.x, teacher.weight, V, 5, chunk=CHUNK)
    losses = [chunked_kl(x, case["w"], teacher, V, CHUNK), chunked_kl(x, case["w"], teacher, V, CHUNK, "reverse"),
              chunked_l2(x, case["w"], teacher, V, CHUNK), chunked_kl(x, case["w"], cache, V, CHUNK),
              chunked_ce(x, case["w"], case["y"], V, CHUNK)]
    sum(losses).backward()
    assert all(torch.isfinite(loss) for loss in losses) and torch.isfinite(x.grad).all()


def test_response_positions_and_gather():
    labels = torch.tensor([[-100, -100, 5, 6, -100],    # padding at the end is -100 too
                           [-100, 7, -100, 8, 9]])
    index, targets = response_positions(labels)
    assert index.tolist() == [1, 2, 5, 7, 8] and targets.tolist() == [5, 6, 7, 8, 9]
    h = torch.arange(2 * 5 * 3.0).reshape(2, 5, 3)
    assert torch.equal(gather(h, index), h.reshape(10, 3)[[1, 2, 5, 7, 8]])
    index, targets = response_positions(torch.full((2, 4), -100))
    assert index.numel() == targets.numel() == 0


def test_user_errors(case):
    cache = topk_logprobs(case["xt"], case["wt"], V, 5, chunk=CHUNK)
    with pytest.raises(ValueError, match="reverse KL needs the full teacher distribution"):
        chunked_kl(case["x"], case["w"], cache, V, CHUNK, direction="reverse")
    with pytest.raises(ValueError, match="temperature"):
        chunked_kl(case["x"], case["w"], cache, V, CHUNK, temperature=2.0)
    with pytest.raises(AssertionError, match="target ids"):
        chunked_ce(case["x"], case["w"], case["y"].clone().fill_(V), V, CHUNK)


# ------------------------------------------------------------------------------------------------ pairwise
def test_pairwise_kl_equals_per_pair_chunked_kl(case):
    g = torch.Generator().manual_seed(1)
    students = [torch.randn(N, D, generator=g, requires_grad=True) for _ in range(3)]
    dense = [Dense(torch.randn(N, DT, generator=g), case["wt"]) for _ in range(3)]
    teachers = [*dense, topk_logprobs(dense[0].x, case["wt"], V, 6, chunk=CHUNK)]
    full = pairwise_kl(students, case["w"], teachers, V, chunk=CHUNK)
    assert full.shape == (3, 4) and not full.requires_grad
    for i, s in enumerate(students):
        for j, t in enumerate(teachers):
            torch.testing.assert_close(full[i, j], chunked_kl(s, case["w"], t, V, CHUNK).detach())
    band = [(0, 0), (0, 1), (1, 2), (2, 3)]
    some = pairwise_kl(students, case["w"], teachers, V, pairs=band, chunk=CHUNK)
    for i in range(3):
        for j in range(4):
            assert some[i, j] == (full[i, j] if (i, j) in band else float("inf"))
    rev = pairwise_kl(students, case["w"], dense, V, chunk=CHUNK, direction="reverse")
    torch.testing.assert_close(rev[2, 1], chunked_kl(students[2], case["w"], dense[1], V, CHUNK, "reverse").detach())
    with pytest.raises(ValueError, match="reverse KL"):
        pairwise_kl(students, case["w"], teachers, V, chunk=CHUNK, direction="reverse")


# ------------------------------------------------------------------------------------------------ memory
class _Largest(TorchDispatchMode):
    """Records the numel of every tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest, self.ops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest(fn, x, w):
    fwd, bwd = _Largest(), _Largest()
    with fwd:
        loss = fn(x, w)
    with bwd:
        loss.backward()
    assert bwd.ops > 0, "the probe must see backward"
    return max(fwd.largest, bwd.largest)


@pytest.mark.parametrize("loss", ["ce", "kl", "kl_topk"])
def test_no_tokens_by_vocab_tensor(loss):
    n, d, v, chunk = 512, 16, 1000, 64
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(n, d, generator=g, requires_grad=True), torch.randn(1024, d, generator=g, requires_grad=True)
    xt, wt, y = torch.randn(n, d, generator=g), torch.randn(1024, d, generator=g), torch.randint(0, v, (n,))
    cache = topk_logprobs(xt, wt, v, 32, chunk=chunk)
    fns = {"ce": lambda x, w: chunked_ce(x, w, y, v, chunk),
           "kl": lambda x, w: chunked_kl(x, w, Dense(xt, wt), v, chunk),
           "kl_topk": lambda x, w: chunked_kl(x, w, cache, v, chunk)}
    bound = max(chunk * v, w.numel(), x.numel())
    assert _largest(fns[loss], x, w) <= bound
    naive = (lambda x, w: F.cross_entropy(x @ w[:v].T, y, reduction="sum")) if loss == "ce" else \
        (lambda x, w: F.kl_div(_lq(x, w, v=v), _lq(xt, wt, v=v), log_target=True, reduction="sum"))
    assert _largest(naive, x.detach().clone().requires_grad_(), w) >= n * v  # the probe can fail


# ------------------------------------------------------------------------------------------------ gradcheck
def test_gradcheck_fp64():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = Dense(torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g,
                                                                                      dtype=torch.float64))
    y = torch.tensor([0, 6, 3, 2, 5])
    assert torch.autograd.gradcheck(lambda x, w: chunked_ce(x, w, y, 7, chunk=2, temperature=1.5), (x, w))
    for direction in ("forward", "reverse"):
        assert torch.autograd.gradcheck(lambda x, w, d=direction: chunked_kl(x, w, teacher, 7, chunk=2, direction=d,
                                                                             temperature=0.8), (x, w))
    assert torch.autograd.gradcheck(lambda x, w: chunked_l2(x, w, teacher, 7, chunk=2), (x, w))


# ------------------------------------------------------------------------------------------------ shortcuts
def _chunked_lse(x, w, t=1.0, v=V, chunk=CHUNK):
    """The student logsumexp per token, as pairwise_kl makes it (same chunks, same matmul shapes)."""
    from vlsi_edge.distill.losses import _lse

    return torch.cat([_lse(x[lo:lo + chunk] @ w[:v].T / t) for lo in range(0, x.shape[0], chunk)])


@pytest.mark.parametrize("op,t,peaky", [("kl_fwd", 1.0, False), ("kl_fwd", 2.0, False), ("l2", 1.0, False),
                                        ("kl_fwd", 1.0, True), ("kl_fwd", 2.0, True), ("l2", 1.0, True)])
def test_student_lse_changes_neither_loss_nor_grads(case, op, t, peaky):
    """peaky: the teacher's ids are the student's own top-5 and x is sharpened, so most rows hold > 1/2 of their mass
    there and take the exact rest (a row-subset matmul, which may round differently); otherwise no row does and the
    two paths are bit-identical."""
    x0 = case["x"] * (4 if peaky else 1)
    cache = topk_logprobs(case["xt"], case["wt"], V, 5, chunk=CHUNK, temperature=t)
    if peaky:
        own = topk_logprobs(x0, case["w"], V, 5, chunk=CHUNK, temperature=t)
        cache = TopK(own.ids, cache.logprobs, t)
    mass = _lq(x0, case["w"], t).exp().gather(1, cache.ids).sum(-1)
    assert ((mass > 0.5).sum() > N // 2) if peaky else bool((mass <= 0.5).all())
    lse = _chunked_lse(x0, case["w"], t)
    torch.testing.assert_close(lse, (x0 @ case["w"][:V].T / t).logsumexp(-1))
    loss = (lambda x, w, s: chunked_kl(x, w, cache, V, CHUNK, temperature=t, student_lse=s)) if op == "kl_fwd" else \
        (lambda x, w, s: chunked_l2(x, w, cache, V, CHUNK, student_lse=s))
    runs = []
    for s in (None, lse):
        x, w = x0.clone().requires_grad_(), case["w"].clone().requires_grad_()
        out = loss(x, w, s)
        out.backward()
        runs.append((out.detach(), x.grad, w.grad))
    for got, want in zip(runs[1], runs[0]):
        if peaky:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * max(1.0, want.abs().max().item()))
        else:
            assert torch.equal(got, want)
    naive = naive_topk(op, x0, case["w"], case["xt"], case["wt"], 5, t) if not peaky else None
    if naive is not None:
        torch.testing.assert_close(runs[1][0], naive.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_student_rest_fallback_matches_exact_masked_logsumexp(monkeypatch, dtype):
    from vlsi_edge.distill import losses as L

    g = torch.Generator().manual_seed(4)
    v, k = 3000, 8
    s = torch.randn(6, v, generator=g, dtype=dtype)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(6)])
    # sum q_k per row: tiny and 0.3 (log1p branch); 0.7, 1 - 1e-4, 1 - 1e-6, 1 - 1e-12 (exact branch)
    m = torch.tensor([0.001, 0.3, 0.7, 1 - 1e-4, 1 - 1e-6, 1 - 1e-12], dtype=torch.float64)
    at = s.double().gather(1, ids).logsumexp(-1)
    off = (m / (1 - m)).log() + s.double().scatter(1, ids, float("-inf")).logsumexp(-1) - at
    s.scatter_add_(1, ids, off.to(dtype)[:, None].expand(6, k))
    lse = s.logsumexp(-1)
    lqk = s.gather(1, ids) - lse[:, None]
    s64 = s.double()
    want = (s64.scatter(1, ids, float("-inf")).logsumexp(-1) - s64.logsumexp(-1)).to(dtype)
    mass = lqk.double().exp().sum(-1)
    assert mass[0] < 0.01 and 0.2 < mass[1] < 0.4 and 0.6 < mass[2] < 0.8 and 1 - mass[5] < 1e-9
    seen = []

    def exact(rows):
        seen.extend(rows.tolist())
        return L._masked_lse(s[rows], ids[rows]) - lse[rows]

    got = L._student_rest(lqk, v, exact)
    assert seen == [2, 3, 4, 5]  # only the rows past EXACT_REST_ABOVE
    torch.testing.assert_close(got, L._masked_lse(s, ids) - lse, rtol=0, atol=1e-6)  # same dtype
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-6)  # fp64 truth (fp32 ulp at |27.6| is 1.9e-6)
    monkeypatch.setattr(L, "EXACT_REST_ABOVE", 1.0)  # without the fallback, 1 - sum q_k loses row 5's rest
    if dtype == torch.float32:
        assert not torch.allclose(L._student_rest(lqk, v, exact), want, rtol=0, atol=1e-6)
    assert torch.equal(L._student_rest(lqk, k, exact), torch.full((6,), float("-inf"), dtype=dtype))  # k == vocab


def test_pairwise_kl_returns_each_paired_layers_logsumexp(case):
    g = torch.Generator().manual_seed(5)
    students = [torch.randn(N, D, generator=g) for _ in range(3)]
    teachers = [Dense(case["xt"], case["wt"]), topk_logprobs(case["xt"], case["wt"], V, 6, chunk=CHUNK)]
    band = [(0, 1), (2, 0), (2, 1)]
    out, lse = pairwise_kl(students, case["w"], teachers, V, pairs=band, chunk=CHUNK, return_lse=True)
    assert torch.equal(out, pairwise_kl(students, case["w"], teachers, V, pairs=band, chunk=CHUNK))
    assert sorted(lse) == [0, 2]
    for i in lse:
        torch.testing.assert_close(lse[i], (students[i] @ case["w"][:V].T).logsumexp(-1), rtol=0, atol=1e-6)
        assert torch.equal(lse[i], _chunked_lse(students[i], case["w"]))  # what chunked_kl's forward makes
    none = TopK(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4))
    _, empty = pairwise_kl([torch.zeros(0, D)], case["w"], [none], V, chunk=CHUNK, return_lse=True)
    assert empty[0].shape == (0,)


def test_student_lse_forward_makes_no_tokens_by_vocab_tensor():
    n, d, v, chunk = 512, 16, 1000, 64
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(n, d, generator=g, requires_grad=True), torch.randn(1024, d, generator=g)
    cache = topk_logprobs(torch.randn(n, d, generator=g), torch.randn(1024, d, generator=g), v, 32, chunk=chunk)
    lse = _chunked_lse(x.detach(), w, v=v, chunk=chunk)
    probe = _Largest()
    with probe:
        loss = chunked_kl(x, w, cache, v, chunk, student_lse=lse)
    assert probe.largest < chunk * v  # logits only at the ids; the (c, V) matmul is left to backward
    assert _largest(lambda x, w: chunked_kl(x, w, cache, v, chunk, student_lse=lse), x, w) <= chunk * v
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_topk_grad_when_student_rest_underflows_against_teacher_rest():
    """Rows whose student rest is ~e^-100 of the teacher's (r / q_r > 1e30) take the log-domain branch of the
    gradient; fp64 autograd through an exact masked-logsumexp twin is the reference."""
    g = torch.Generator().manual_seed(6)
    n, v, k = 12, 50, 5
    logits = torch.randn(n, v, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    logits[::2].scatter_add_(1, ids[::2], torch.full((n // 2, k), 100.0, dtype=torch.float64))  # even rows: peaky
    pk = torch.rand(n, k, generator=g, dtype=torch.float64) + 0.1
    cache = TopK(ids, (0.9 * pk / pk.sum(-1, keepdim=True)).log().float())  # teacher rest 0.1 on every row
    w0 = torch.eye(v, dtype=torch.float64)                                 # logits = x @ I

    def exact(x, w):
        lq = F.log_softmax(x @ w[:v].T, -1)
        lpk = cache.logprobs.double()
        rest = 1 - lpk.exp().sum(-1)
        lqr = lq.scatter(1, ids, float("-inf")).logsumexp(-1)
        return (lpk.exp() * (lpk - lq.gather(1, ids))).sum() + (rest * (rest.log() - lqr)).sum()

    runs = []
    for fn in (lambda x, w: chunked_kl(x, w, cache, v, chunk=5), exact):
        x, w = logits.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(x, w)
        loss.backward()
        runs.append((loss.detach(), x.grad, w.grad))
    assert torch.isfinite(runs[0][1]).all()
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9 * max(1.0, want.abs().max().item()))
