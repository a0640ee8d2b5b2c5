"""The lean tokenizer (tokenizers + tokenizer.json) against transformers' CLIPTokenizer."""

from __future__ import annotations

import pytest

from lcm_export.runtime.tokenizer import ClipTokenizer

PROMPTS = ["a photo of an astronaut riding a horse", "", "Hello, WORLD!!  multiple   spaces", "ünïcödé — émoji 🚀",
           " ".join(["astronaut"] * 60)]  # the last is longer than 77 tokens: truncated with EOS kept


@pytest.fixture(scope="module")
def saved_tokenizer(tmp_path_factory, demo_pipe):
    from lcm_export.builder.build_engine import _copy_tokenizer

    d = tmp_path_factory.mktemp("tok")
    _copy_tokenizer(demo_pipe.tokenizer, d)
    return d / "tokenizer.json"


def test_matches_transformers(saved_tokenizer, demo_pipe):
    ref = demo_pipe.tokenizer
    ours = ClipTokenizer(saved_tokenizer, 77, ref.pad_token_id)
    got = ours(PROMPTS)
    want = ref(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    assert got.shape == (len(PROMPTS), 77)
    assert got.tolist() == want
    assert got[-1, -1] == ref.eos_token_id and got[0, 0] == ref.bos_token_id
