"""Family-specific checks for the Qwen2.5-VL, InternVL and Gemma 3 adapters: one fixed tile per image whatever
the input size, the chat template equals the ChatFormat, and each family's quirk (window attention, InternVL's
image-feature path, Gemma 3's scaled embeddings)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from vlsi_edge.models import load_model  # noqa: E402
from vlsi_edge.models.chat import CHAT_FORMATS  # noqa: E402

FAMILIES = ("qwen2_5vl", "internvl", "gemma3")


@pytest.fixture(scope="module", params=FAMILIES)
def student(request):
    return load_model(f"builtin:tiny-{request.param}-student")


def _prompt(m):
    return m.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]}],
        tokenize=False, add_generation_prompt=True)


def test_one_fixed_tile_for_any_input_size(student, torch_threads):
    m = student
    # Qwen2.5-VL's smart_resize keeps the aspect ratio: fixed only for square inputs (the collator squares them)
    sizes = [(112, 112), (448, 448), (57, 57)] if m.family == "qwen2_5vl" else [(112, 112), (640, 480), (50, 300)]
    seen = set()
    for size in sizes:
        out = m.processor(images=[Image.new("RGB", size, (10, 200, 30))], text=[_prompt(m)], return_tensors="pt")
        seen.add((tuple(out["pixel_values"].shape), int((out["input_ids"] == m.model.config.image_token_id).sum())))
    assert len(seen) == 1, seen
    assert m.image_token_count() == 16 == next(iter(seen))[1]


def test_chat_template_matches_chat_format(student):
    m, fmt = student, CHAT_FORMATS[student.family]
    turns = [("user", "Hi?"), ("assistant", "red"), ("user", "And now?")]
    msgs = [{"role": r, "content": ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": t}]}
            for i, (r, t) in enumerate(turns)]
    assert m.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        fmt.render(turns, has_image=True, add_generation_prompt=True)


def test_qwen2_5vl_window_attention_is_a_no_op():
    from transformers.vision_utils import get_vision_window_index

    m = load_model("builtin:tiny-qwen2_5vl-student")
    vc = m.model.config.vision_config
    assert list(vc.fullatt_block_indexes) == list(range(vc.depth))
    grid = m.image_size // vc.patch_size
    index, cu = get_vision_window_index(torch.tensor([[1, grid, grid]]), vc.spatial_merge_size, vc.window_size,
                                        vc.patch_size)
    assert index.tolist() == list(range((grid // vc.spatial_merge_size) ** 2)) and cu.tolist() == [0, grid * grid]


def test_internvl_processor_keeps_image_seq_length(tmp_path):
    m = load_model("builtin:tiny-internvl-student")
    m.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    assert again.processor.image_seq_length == m.model.config.image_seq_length == 16
    assert again.processor.image_processor.max_patches == 1


def test_gemma3_layer0_is_scaled_embedding(torch_threads):
    m = load_model("builtin:tiny-gemma3-student")
    tc = m.text_config
    assert tc.final_logit_softcapping is None and not m.model.config.tie_word_embeddings
    assert "full_attention" in tc.layer_types and "sliding_attention" in tc.layer_types
    batch = dict(m.processor(images=[Image.new("RGB", (112, 112))], text=[_prompt(m)], return_tensors="pt"))
    with torch.no_grad():
        h0 = m.hidden_states(batch, [0])[0]
        text = batch["input_ids"] != m.model.config.image_token_id
        emb = m.embed_tokens.weight[batch["input_ids"]] * tc.hidden_size ** 0.5
    torch.testing.assert_close(h0[text], emb[text])
