"""The collator: assistant-only labels, processor-consistent token ids, left-padded generation prompts."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from vlsi_edge.data.collate import IGNORE, Collator  # noqa: E402
from vlsi_edge.data.conversations import Sample, Turn  # noqa: E402
from vlsi_edge.models import load_model  # noqa: E402
from vlsi_edge.models.chat import CHAT_FORMATS  # noqa: E402
from vlsi_edge.models.presets import FAMILY_NAMES  # noqa: E402


def _samples(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (90, 70), (0, 0, 255)).save(img)
    one = Sample(id="a", image=img, turns=(Turn("user", "What colour is the square? Answer with one word."),
                                            Turn("assistant", "blue")), meta={})
    multi = Sample(id="b", image=img, turns=(Turn("user", "How many squares are there?"), Turn("assistant", "1"),
                                              Turn("user", "What colour is it?"), Turn("assistant", "blue")), meta={})
    return [one, multi]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_labels_cover_assistant_turns_only(family, tmp_path, torch_threads):
    m = load_model(f"builtin:tiny-{family}-student")
    fmt = CHAT_FORMATS[family]
    samples = _samples(tmp_path)
    batch = Collator(m, mode="train")(samples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    tok = m.tokenizer
    for i, s in enumerate(samples):
        lab = batch["labels"][i]
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()]
        trained = tok.decode(lab[lab != IGNORE].tolist())
        expected = "".join(t.text + fmt.assistant_end for t in s.turns if t.role == "assistant")
        assert trained == expected
        # the same ids as the processor on the whole rendered conversation
        full = fmt.render([(t.role, t.text) for t in s.turns], has_image=True)
        ref = m.processor(images=[Image.open(s.image).convert("RGB").resize((m.image_size,) * 2, Image.BICUBIC)],
                          text=[full], return_tensors="pt")["input_ids"][0]
        assert ids.tolist() == ref.tolist()
    with torch.no_grad():
        out = m.model(**batch)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("family", ["qwen2vl", "gemma3"])
def test_generate_mode_pads_left_and_stops_at_last_user_turn(family, tmp_path, torch_threads):
    m = load_model(f"builtin:tiny-{family}-student")
    samples = _samples(tmp_path)
    batch = Collator(m, mode="generate")(samples)
    assert "labels" not in batch
    assert (batch["attention_mask"][:, -1] == 1).all()
    fmt = CHAT_FORMATS[family]
    text = m.tokenizer.decode(batch["input_ids"][1][batch["attention_mask"][1].bool()].tolist())
    assert text.endswith(fmt.assistant_prefix) and "What colour is it?" in text and not text.endswith("blue")
    with torch.no_grad():
        gen = m.model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert gen.shape[0] == 2
