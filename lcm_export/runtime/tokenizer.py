"""CLIP tokenization with the ``tokenizers`` library, from the tokenizer.json copied into the engine store."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class ClipTokenizer:
    """Pad/truncate to ``max_length`` (77) with BOS/EOS as the model's tokenizer adds them."""

    def __init__(self, path: str | Path, max_length: int = 77, pad_id: int | None = None):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))
        self.max_length = max_length
        if pad_id is None:
            pad_id = self.tok.token_to_id("<|endoftext|>")
        self.tok.no_padding()
        self.tok.enable_truncation(max_length=max_length)
        self.tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=self.tok.id_to_token(pad_id))

    def __call__(self, texts: list[str]) -> np.ndarray:
        """token ids, int32 [len(texts), max_length]"""
        return np.asarray([e.ids for e in self.tok.encode_batch(list(texts))], dtype=np.int32)
