"""LLaVA-OneVision and SmolVLM/Idefics3 specifics: fixed image-token counts, no tiling/splitting, processor
settings that survive save/load, LLaVA-OV's hook-based image features on a mixed batch, Idefics3 checkpoints."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from vlsi_edge.models import load_model  # noqa: E402
from vlsi_edge.models.chat import CHAT_FORMATS  # noqa: E402

FAMILIES = ("llava_onevision", "smolvlm")
TOKENS_AT_112 = {"llava_onevision": 136, "smolvlm": 16}  # LLaVA-OV: 8×8 base + 8×8 patch + 8 newlines


def _prompt(m, text="What colour is the circle?"):
    return m.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
        tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def students():
    return {fam: load_model(f"builtin:tiny-{fam}-student") for fam in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_image_tokens_fixed_and_single_tile(family, students, torch_threads):
    m = students[family]
    assert m.image_size == 112 and m.image_token_count() == TOKENS_AT_112[family]
    tiles = 2 if family == "llava_onevision" else 1  # LLaVA-OV: base view + one 112 patch (its minimum)
    for size in [(112, 112), (300, 120), (40, 200)]:
        out = m.processor(images=[Image.new("RGB", size, (0, 90, 200))], text=[_prompt(m)], return_tensors="pt")
        assert tuple(out["pixel_values"].shape) == (1, tiles, 3, 112, 112)
        if family == "smolvlm" or size[0] == size[1]:
            assert int((out["input_ids"] == m.model.config.image_token_id).sum()) == TOKENS_AT_112[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_format_matches_template(family, students):
    m, fmt = students[family], CHAT_FORMATS[family]
    turns = [("system", "Be brief."), ("user", "What shape?"), ("assistant", "a star"), ("user", "Colour?")]
    msgs = [{"role": r, "content": ([{"type": "image"}] if i == 1 else []) + [{"type": "text", "text": t}]}
            for i, (r, t) in enumerate(turns)]
    for gen in (False, True):
        want = fmt.render(turns, has_image=True, add_generation_prompt=gen)
        assert m.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == want
        assert m.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == want


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_settings_round_trip(family, students, tmp_path):
    m = students[family]
    m.save_pretrained(tmp_path / "ck")
    again = load_model(str(tmp_path / "ck"))
    if family == "llava_onevision":
        for key in ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio"):
            assert getattr(again.processor, key) == getattr(m.processor, key), key
        assert again.processor.image_processor.image_grid_pinpoints == [[112, 112]]
    else:
        assert again.processor.image_seq_len == m.processor.image_seq_len == 16
        assert again.processor.image_processor.do_image_splitting is False
    assert again.image_token_count() == TOKENS_AT_112[family]


def test_llava_onevision_hidden_states_mixed_batch(students, torch_threads):
    """Two samples, left padding, a non-square image (unpadded features): hooks == output_hidden_states."""
    m = students["llava_onevision"]
    images = [Image.new("RGB", (112, 112), (200, 30, 30)), Image.new("RGB", (200, 90), (30, 30, 200))]
    texts = [_prompt(m), _prompt(m, "How many stars are there? Answer with a number.")]
    batch = dict(m.processor(images=images, text=texts, return_tensors="pt", padding=True))
    wanted = [0, 2, m.num_layers]
    with torch.no_grad():
        states = m.hidden_states(batch, wanted)
        ref = m.model(**batch, output_hidden_states=True)
    for k in wanted:
        torch.testing.assert_close(states[k], ref.hidden_states[k], rtol=1e-5, atol=1e-5, msg=f"layer {k}")


def test_idefics3_checkpoint_loads_as_smolvlm(students, tmp_path, torch_threads):
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil,
                              Idefics3Processor)

    from vlsi_edge.models.tokenizer import hf_tokenizer

    src = students["smolvlm"]
    cfg = src.model.config
    config = Idefics3Config(text_config=cfg.text_config.to_dict(), vision_config=cfg.vision_config.to_dict(),
                            scale_factor=cfg.scale_factor, image_token_id=cfg.image_token_id,
                            tie_word_embeddings=False)
    config.vlsi_edge = {"target_layers": [1, 2], "image_size": 112}
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = cfg.text_config.eos_token_id
    model.generation_config.pad_token_id = cfg.text_config.pad_token_id
    size = {"longest_edge": 112}
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(do_image_splitting=False, size=size, max_image_size=size),
        tokenizer=hf_tokenizer("smolvlm"), image_seq_len=16, chat_template=src.tokenizer.chat_template)
    model.save_pretrained(tmp_path / "ck")
    processor.save_pretrained(tmp_path / "ck")

    m = load_model(str(tmp_path / "ck"))
    assert m.family == "smolvlm" and type(m.model) is Idefics3ForConditionalGeneration
    assert m.target_layers == [1, 2] and m.image_token_count() == 16
    batch = dict(m.processor(images=[Image.new("RGB", (112, 112), (9, 9, 9))], text=[_prompt(m)],
                             return_tensors="pt"))
    with torch.no_grad():
        states = m.hidden_states(batch, [0, 1, m.num_layers])
        ref = m.model(**batch, output_hidden_states=True)
        out = m.model.generate(**batch, max_new_tokens=2, do_sample=False)
    for k in (0, 1, m.num_layers):
        torch.testing.assert_close(states[k], ref.hidden_states[k], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.lm_head(states[m.num_layers]), ref.logits, rtol=1e-5, atol=1e-5)
    assert out.shape[1] > batch["input_ids"].shape[1]
