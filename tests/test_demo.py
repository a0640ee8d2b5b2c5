"""The built-in demo: offline, deterministic — demo LoRA files are byte-identical across processes."""

from __future__ import annotations

import subprocess

from conftest import PY


def test_demo_loras_are_identical_across_processes(tmp_path):
    code = ("import sys\nfrom lcm_export.sources.demo import build_demo_pipeline, write_demo_loras\n"
            "from lcm_export._util import sha256_file\n"
            "print(' '.join(sha256_file(p) for p, _ in write_demo_loras(build_demo_pipeline('sd15'), sys.argv[1])))")
    a, b = (subprocess.run([PY, "-c", code, str(tmp_path / d)], capture_output=True, text=True, check=True).stdout.split()
            for d in ("a", "b"))
    assert a == b and len(a) == 2


def test_demo_tokenizer_is_byte_level_and_offline(demo_pipe):
    from lcm_export.sources.demo import demo_vocab

    vocab, merges = demo_vocab()
    assert len(vocab) == len(demo_pipe.tokenizer) and merges
    ids = demo_pipe.tokenizer("ünïcödé 🚀 text").input_ids
    assert ids[0] == demo_pipe.tokenizer.bos_token_id and ids[-1] == demo_pipe.tokenizer.eos_token_id
    assert demo_pipe.tokenizer.unk_token_id not in ids[1:-1]  # every byte has a token
