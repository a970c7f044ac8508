"""Device-side prompt building and decoding with the bundle's `tokenizer.json` (the `tokenizers` library only).

The bundle's generation.json holds the chat template already rendered and expanded exactly as the family's HF
processor expands it (image placeholder → the model's image tokens), with one `{prompt}` slot:

    text = Prompter(bundle).ids("What colour is the circle?")     # int64 ids, identical to the host's
"""
from __future__ import annotations

import numpy as np


class Prompter:
    def __init__(self, tokenizer_path, generation: dict):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.template = generation["template"]
        self.eos_ids = set(generation["eos_token_ids"])

    def ids(self, prompt: str) -> np.ndarray:
        head, tail = self.template.split("{prompt}")
        text = head + prompt + tail
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
