"""The offline tokenizer of the built-in presets: a byte-level BPE trained deterministically from shipped text.

Every tiny preset of a family uses the same tokenizer (teacher and student must share token order): the base BPE
is trained from `vlsi_edge/assets/corpus.txt` plus phrases generated from the built-in suite's word lists, then the
family's special tokens (chat markers, image placeholders) are appended in a fixed order. Same input, same file.

    python -c "from vlsi_edge.models.tokenizer import hf_tokenizer; print(hf_tokenizer('qwen2vl'))"
"""
from __future__ import annotations

import functools
import itertools
from importlib import resources

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from vlsi_edge.models.chat import CHAT_FORMATS

BASE_VOCAB_SIZE = 1024  # 256 byte symbols + merges

_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "grey", "white", "black"]
_SHAPES = ["circle", "square", "triangle", "cross", "star", "circles", "squares", "triangles", "crosses", "stars"]
_WHERE = ["left", "right", "above", "below"]
_NUMBERS = [str(i) for i in range(0, 21)]


def corpus_lines() -> list[str]:
    """The training text: the shipped prose plus every short phrase of the built-in suite's vocabulary."""
    text = resources.files("vlsi_edge.assets").joinpath("corpus.txt").read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for colour, shape in itertools.product(_COLOURS, _SHAPES):
        lines.append(f"What colour is the {shape}? The {shape} is {colour}. What shape is the {colour} object?")
    for a, b in itertools.product(_SHAPES[:5], _SHAPES[5:]):
        lines.append(f"Are there more {b} than {a}s? How many {b} are there? Answer yes or no.")
    for where, n in itertools.product(_WHERE, _NUMBERS):
        lines.append(f"It is {where} of it. There are {n} of them. Answer with a number: {n}")
    return lines


@functools.lru_cache(maxsize=None)
def base_tokenizer() -> Tokenizer:
    """The family-independent byte-level BPE (deterministic: single-threaded trainer over a fixed line order)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB_SIZE, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    return tok


def family_tokenizer(family: str) -> Tokenizer:
    """The base BPE with the family's special tokens appended (ids right after the base vocabulary, fixed order)."""
    fmt = CHAT_FORMATS[family]
    tok = Tokenizer.from_str(base_tokenizer().to_str())
    tok.add_special_tokens(fmt.all_special_tokens())
    return tok


def hf_tokenizer(family: str):
    """A transformers `PreTrainedTokenizerFast` with the family's named special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    fmt = CHAT_FORMATS[family]
    kwargs = dict(
        tokenizer_object=family_tokenizer(family),
        eos_token=fmt.eos, pad_token=fmt.pad,
        extra_special_tokens=dict(fmt.special_tokens),
        chat_template=fmt.jinja(), padding_side="left",
        model_max_length=4096,
    )
    if fmt.bos:
        kwargs["bos_token"] = fmt.bos
    return PreTrainedTokenizerFast(**kwargs)
