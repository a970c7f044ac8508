"""Offline teacher cache vs the live teacher: losses, top-k + rest, lookup order, resume, refusals, size estimate."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load_file

from vlsi_edge.data.collate import Collator
from vlsi_edge.data.conversations import open_dataset
from vlsi_edge.distill import losses
from vlsi_edge.distill.stages import Side
from vlsi_edge.distill.teacher_cache import (
    MANIFEST,
    build_cache,
    estimate_bytes,
    open_cache,
    ready,
)
from vlsi_edge.distill.verbalizer import Verbalizers, fingerprint
from vlsi_edge.errors import UserError
from vlsi_edge.models import load_model

DATA = "builtin:shapes:n_pretrain=0,n_train=12,n_val=0,n_test=0"
T_LAYERS = [3, 6]
SHARD_ITEMS, BATCH = 5, 4  # 12 samples -> shards of 5, 5, 2; batches of 4, 1 | 4, 1 | 2


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLSI_EDGE_CACHE", str(tmp_path_factory.getbasetemp() / "vlsi_cache"))
        samples = list(open_dataset(DATA, split="train"))
    torch.manual_seed(0)
    teacher = load_model("builtin:tiny-qwen2vl-teacher")
    student = load_model("builtin:tiny-qwen2vl-student")
    # paper-literal verbalizers with random down weights: they differ from the logit lens
    t_side = Side(teacher, Verbalizers(T_LAYERS, teacher.hidden_size, residual=False))
    s_side = Side(student, Verbalizers(student.target_layers, student.hidden_size, residual=False))
    vocab = len(teacher.tokenizer)
    e = SimpleNamespace(samples=samples, t_side=t_side, s_side=s_side, vocab=vocab, tn=teacher.num_layers,
                        sn=student.num_layers, s_layer=student.target_layers[1],
                        t_collate=Collator(teacher, mode="train"), s_collate=Collator(student, mode="train"),
                        tmp=tmp_path_factory.mktemp("tcache"))
    e.identity = lambda k, **kw: {"teacher": "builtin:tiny-qwen2vl-teacher", "teacher_hash": fingerprint(teacher.model),
                                  "teacher_verbalizers_hash": fingerprint(t_side.verb), "t_layers": T_LAYERS,
                                  "vocab": vocab, "top_k": k, "data": DATA, "split": "train",
                                  "n_samples": len(samples), **kw}
    return e


def _build(env, out, k, log=None, **identity):
    return build_cache(out, env.t_side, T_LAYERS, env.samples, env.t_collate, env.vocab, top_k=k, chunk=7,
                       shard_items=SHARD_ITEMS, batch_size=BATCH, identity=env.identity(k, **identity),
                       log=log or (lambda msg: None))


@pytest.fixture(scope="module")
def full_cache(env):
    return _build(env, env.tmp / "full", env.vocab)


@pytest.fixture(scope="module")
def top5_cache(env):
    return _build(env, env.tmp / "top5", 5)


def _live(env, items):
    """Live teacher features (target layers + final) and student features, on the response tokens of `items`."""
    with torch.no_grad():
        tb = env.t_collate(items)
        t_index, _ = losses.response_positions(tb.pop("labels"))
        t = env.t_side(tb, [*T_LAYERS, env.tn], t_index, backbone_grad=False)
        sb = env.s_collate(items)
        s_index, _ = losses.response_positions(sb.pop("labels"))
        s = env.s_side(sb, [env.s_layer, env.sn], s_index, backbone_grad=False)
    assert t_index.numel() == s_index.numel() > 0
    return t, s


def _shards(folder):
    """Every shard's tensors, copied out of the memory map (the test then truncates files in place)."""
    return {p.name: {k: v.clone() for k, v in load_file(str(p)).items()}
            for p in sorted(folder.glob("shard-*.safetensors"))}


# ------------------------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("items", [slice(0, 4), slice(3, 8)], ids=["one-build-batch", "across-shards"])
def test_full_vocab_cache_gives_the_live_teachers_loss(env, full_cache, items, torch_threads):
    items = env.samples[items]
    t, s = _live(env, items)
    cache = open_cache(full_cache, env.identity(env.vocab))
    got = cache.lookup([x.id for x in items], T_LAYERS, final_only=False)
    assert got["n"] == s[env.sn].shape[0]
    w_s, w_t, v = env.s_side.adapter.lm_head.weight, env.t_side.adapter.lm_head.weight, env.vocab
    for x_s, cached, live in [(s[env.s_layer], got["layers"][1], t[T_LAYERS[1]]), (s[env.sn], got["final"], t[env.tn])]:
        want = losses.chunked_kl(x_s, w_s, losses.Dense(live, w_t), v)
        have = losses.chunked_kl(x_s, w_s, cached, v)
        assert want > 0.1
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)


def test_top5_cache_equals_naive_topk_plus_rest(env, top5_cache, torch_threads):
    items = env.samples[0:4]
    t, s = _live(env, items)
    got = open_cache(top5_cache, env.identity(5)).lookup([x.id for x in items], T_LAYERS, final_only=False)
    w_s, w_t, v = env.s_side.adapter.lm_head.weight.double(), env.t_side.adapter.lm_head.weight.double(), env.vocab
    for x_s, cached, x_t in [(s[env.s_layer], got["layers"][1], t[T_LAYERS[1]]), (s[env.sn], got["final"], t[env.tn])]:
        lp = torch.log_softmax(x_t.double() @ w_t[:v].T, -1)                 # (N, V) live teacher
        lpk, ids = lp.topk(5, -1)
        assert torch.equal(cached.ids, ids)
        torch.testing.assert_close(cached.logprobs, lpk.float(), rtol=0, atol=1e-5)
        lq = torch.log_softmax(x_s.double() @ w_s[:v].T, -1)                  # (N, V) student
        lqk = lq.gather(1, ids)
        rest, q_rest = 1 - lpk.exp().sum(-1), 1 - lqk.exp().sum(-1)
        naive = (lpk.exp() * (lpk - lqk)).sum() + (rest * (rest.log() - q_rest.log())).sum()
        have = losses.chunked_kl(x_s, env.s_side.adapter.lm_head.weight, cached, v)
        torch.testing.assert_close(have.double(), naive, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ lookup
def test_lookup_follows_the_requested_order(env, top5_cache):
    cache = open_cache(top5_cache, env.identity(5))
    order = [env.samples[i].id for i in (11, 2, 7, 0, 5)]
    got = cache.lookup(order, T_LAYERS, final_only=False)
    one = [cache.lookup([i], T_LAYERS, final_only=False) for i in order]
    assert got["n"] == sum(o["n"] for o in one) == got["final"].ids.shape[0]
    for key in ("ids", "logprobs"):
        assert torch.equal(getattr(got["final"], key), torch.cat([getattr(o["final"], key) for o in one]))
        for j in range(len(T_LAYERS)):
            assert torch.equal(getattr(got["layers"][j], key), torch.cat([getattr(o["layers"][j], key) for o in one]))
    assert got["final"].ids.dtype == torch.int64 and got["final"].logprobs.dtype == torch.float32
    final_only = cache.lookup(order, T_LAYERS, final_only=True)
    assert "layers" not in final_only and torch.equal(final_only["final"].ids, got["final"].ids)
    with pytest.raises(UserError, match="built for different data"):
        cache.lookup(["no-such-sample"], T_LAYERS, final_only=True)


# ------------------------------------------------------------------------------------------------ resume and refusals
def test_resume_after_kill_reuses_good_shards_and_redoes_the_rest(env, tmp_path, torch_threads):
    out = _build(env, tmp_path / "c", 5)
    before, manifest = _shards(out), json.loads((out / MANIFEST).read_text())
    kept = (out / "shard-00000.safetensors").stat().st_mtime_ns
    (out / MANIFEST).unlink()                                   # killed before the manifest ...
    broken = out / "shard-00001.safetensors"
    broken.write_bytes(broken.read_bytes()[:200])               # ... with one shard half-written
    (out / "shard-00002.safetensors").unlink()                  # ... and one never renamed
    (out / ".shard-00002.safetensors.abc.tmp").write_bytes(b"junk")
    assert not ready(out, env.identity(5))
    with pytest.raises(UserError, match="not ready"):
        open_cache(out, env.identity(5))
    logs = []
    _build(env, out, 5, log=logs.append)
    assert any("shard 1/3 already complete" in m for m in logs)
    assert sum("written" in m for m in logs) == 3  # shards 2, 3 and the final "ready: ... written" line
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == kept
    assert not list(out.glob(".*.tmp"))
    after = _shards(out)
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].keys() == after[name].keys()
        assert all(torch.equal(before[name][k], after[name][k]) for k in before[name])
    strip = [{k: v for k, v in e.items() if k != "sha256"} for e in manifest["shards"]]  # header order may vary
    assert [{k: v for k, v in e.items() if k != "sha256"} for e in json.loads((out / MANIFEST).read_text())["shards"]] \
        == strip
    assert ready(out, env.identity(5))


def test_missing_shard_or_wrong_totals_are_refused(env, tmp_path):
    out = _build(env, tmp_path / "c", 5)
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**manifest, "total_tokens": manifest["total_tokens"] + 1}))
    with pytest.raises(UserError, match="manifest totals") as e:
        open_cache(out, env.identity(5))
    assert "\n" not in str(e.value)
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / "shard-00001.safetensors").unlink()
    with pytest.raises(UserError, match="shard-00001.safetensors listed in the manifest is missing"):
        open_cache(out, env.identity(5))
    assert not ready(out, env.identity(5))
    logs = []
    _build(env, out, 5, log=logs.append)                        # a rebuild repairs it
    assert any("broken" in m for m in logs) and ready(out, env.identity(5))
    open_cache(out, env.identity(5), verify=True)


def test_identity_mismatch_is_refused_naming_the_field(env, top5_cache, tmp_path):
    with pytest.raises(UserError, match=r"differs in: teacher_hash\b.*delete") as e:
        open_cache(top5_cache, env.identity(5, teacher_hash="0" * 64))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="differs in: data, split"):
        ready(top5_cache, env.identity(5, data="elsewhere", split="val"))
    with pytest.raises(UserError, match="differs in: data"):
        _build(env, top5_cache, 5, data="elsewhere")
    partial = {k: v for k, v in env.identity(5).items() if k != "teacher_hash"}  # before the teacher is loaded
    assert ready(top5_cache, partial) and len(open_cache(top5_cache, partial)) == 12
    # shards left by a killed build of another setup are not reused
    out = _build(env, tmp_path / "c", 5)
    (out / MANIFEST).unlink()
    logs = []
    _build(env, out, 5, log=logs.append, data="other")
    assert not any("already complete" in m for m in logs)


def test_size_estimate_is_logged_first_and_within_2x(env, tmp_path):
    out, seen = tmp_path / "c", []
    _build(env, out, 5, log=lambda m: seen.append((m, len(list(out.glob("shard-*"))))))
    first, shards_then = seen[0]
    assert "counted by tokenising" in first and shards_then == 0
    estimate = int(re.search(r"\((\d+) bytes\)", first).group(1))
    written = sum(p.stat().st_size for p in out.glob("shard-*.safetensors"))
    assert written == json.loads((out / MANIFEST).read_text())["total_bytes"]
    assert estimate / 2 <= written <= estimate * 2, (estimate, written)
    tokens = json.loads((out / MANIFEST).read_text())["total_tokens"]
    assert estimate_bytes(tokens, len(T_LAYERS), 5) == tokens * 3 * 5 * 8
