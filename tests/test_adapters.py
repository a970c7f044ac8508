"""Adapter vs HF parity for every family × {teacher, student}: hooks equal output_hidden_states, lm_head(last)
equals logits, generate works with an image, checkpoints round-trip through transformers."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from vlsi_edge.models import load_model  # noqa: E402
from vlsi_edge.models.presets import PRESETS  # noqa: E402


def _batch(m, image_size=None):
    tok = m.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]}],
        tokenize=False, add_generation_prompt=True)
    size = image_size or m.image_size
    img = Image.new("RGB", (size, size), (200, 30, 30))
    return dict(m.processor(images=[img], text=[text], return_tensors="pt"))


class _NoAllHiddenStates:
    """Wraps forwards and records any request for every hidden state."""

    def __init__(self, modules):
        self.asked = []
        self.modules = modules

    def __enter__(self):
        self.saved = []
        for mod in self.modules:
            fwd = mod.forward

            def wrapped(*a, _fwd=fwd, _name=type(mod).__name__, **kw):
                if kw.get("output_hidden_states"):
                    self.asked.append(_name)
                return _fwd(*a, **kw)
            self.saved.append((mod, fwd))
            mod.forward = wrapped
        return self

    def __exit__(self, *exc):
        for mod, fwd in self.saved:
            mod.forward = fwd


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_adapter_matches_hf(name, tmp_path, torch_threads):
    m = load_model(f"builtin:{name}")
    spec = PRESETS[name]
    assert m.family == spec.family
    assert m.num_layers == spec.num_layers and m.hidden_size == spec.hidden_size
    assert m.target_layers == list(spec.target_layers)
    assert m.vocab_size >= len(m.tokenizer) and m.vocab_size % spec.vocab_multiple == 0
    assert m.image_token_count() > 0
    batch = _batch(m)
    wanted = sorted({0, 1, *m.target_layers, m.num_layers})
    # the language model (the module owning the decoder layers) and everything above it; a vision tower may pick
    # its feature layer through transformers' own output_hidden_states=<index>, which is not ours to police
    language_model = next(mod for mod in m.model.modules() if getattr(mod, "layers", None) is m.decoder_layers)
    watched = [m.model, m.model.model, language_model]
    with torch.no_grad(), _NoAllHiddenStates(watched) as probe:
        states = m.hidden_states(batch, wanted)
    assert probe.asked == [], f"adapter asked for all hidden states via {probe.asked}"
    assert sorted(states) == wanted
    with torch.no_grad():
        ref = m.model(**batch, output_hidden_states=True)
    assert len(ref.hidden_states) == m.num_layers + 1
    for k in wanted:
        torch.testing.assert_close(states[k], ref.hidden_states[k], rtol=1e-5, atol=1e-5, msg=f"layer {k}")
    torch.testing.assert_close(m.lm_head(states[m.num_layers]), ref.logits, rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        out = m.model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > batch["input_ids"].shape[1]

    if spec.role == "student" and spec.name.endswith("student"):
        m.save_pretrained(tmp_path / "ck")
        again = load_model(str(tmp_path / "ck"))
        assert again.family == m.family and again.target_layers == m.target_layers
        assert again.image_size == m.image_size
        assert again.tokenizer.convert_ids_to_tokens(list(range(len(m.tokenizer)))) == \
            m.tokenizer.convert_ids_to_tokens(list(range(len(m.tokenizer))))
        with torch.no_grad():
            torch.testing.assert_close(again.model(**_batch(again)).logits, ref.logits)
        from transformers import AutoModelForImageTextToText

        hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "ck")
        assert type(hf) is type(m.model)


def test_teacher_is_larger_and_shares_tokenizer():
    from vlsi_edge.models.presets import FAMILY_NAMES
    from vlsi_edge.models.tokenizer import family_tokenizer

    for fam in FAMILY_NAMES:
        t, s = PRESETS[f"tiny-{fam}-teacher"], PRESETS[f"tiny-{fam}-student"]
        assert t.num_layers > s.num_layers and t.hidden_size > s.hidden_size
        assert len(s.target_layers) >= 4 and len(t.target_layers) >= 2 * len(s.target_layers)
        assert max(s.target_layers) < s.num_layers and max(t.target_layers) < t.num_layers
        assert family_tokenizer(fam).to_str() == family_tokenizer(fam).to_str()


def test_lowres_student_has_fewer_image_tokens():
    t = load_model("builtin:tiny-qwen2vl-teacher")
    s = load_model("builtin:tiny-qwen2vl-student-lowres")
    assert s.image_token_count() != t.image_token_count()
