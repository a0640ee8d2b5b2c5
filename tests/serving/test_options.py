"""`lcm-export serve` flags and start-up errors: one line, exit 2, before any Ray process starts."""

from __future__ import annotations

import pytest

from conftest import run_cli
from lcm_export.serve.server import replica_error


@pytest.mark.parametrize("extra, words", [
    ([], "does not exist"),
    (["--replicas", "0"], "--replicas 0: must be at least 1"),
    (["--max-ongoing-requests", "0"], "--max-ongoing-requests 0"),
    (["--max-batch-size", "0"], "--max-batch-size 0"),
    (["--batch-wait-ms", "-1"], "--batch-wait-ms -1"),
    (["--batch-wait-ms", "nan"], "--batch-wait-ms nan: must be a number from 0 to 1000"),  # issue 19: was accepted
    (["--batch-wait-ms", "inf"], "--batch-wait-ms inf"),
    (["--batch-wait-ms", "1e9"], "--batch-wait-ms 1e+09"),
    (["--replicas", "two"], "--replicas: invalid int value"),
    (["--port", "70000"], "--port 70000"),
    # issue 26: a batch the entry cannot merge is said, not capped without a word
    (["--max-batch-size", "100"], "--max-batch-size 100: "),
])
def test_bad_serve_flags_exit_2_with_one_line(tiny_entry, tmp_path, capsys, extra, words):
    d = tmp_path / "missing" if not extra else tiny_entry
    code, out, err = run_cli(["serve", "--engine-dir", d, *extra], capsys)
    assert code == 2, err
    assert words in err and err.count("\n") == 1 and err.startswith("error: ")


def test_an_entry_that_is_not_one_is_refused_before_ray(tmp_path, capsys):
    (tmp_path / "e").mkdir()
    code, _, err = run_cli(["serve", "--engine-dir", tmp_path / "e"], capsys)
    assert code == 2 and "manifest.json" in err and err.count("\n") == 1


def test_max_batch_size_names_the_entrys_batch(tiny_entry, capsys):
    code, _, err = run_cli(["serve", "--engine-dir", tiny_entry, "--max-batch-size", "2"], capsys)
    assert code == 2 and "was built for batch 1" in err and "use at most 1" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.update(batch=10**30), "'batch' is malformed or out of range"),
    (lambda m: m["vae"].update(scaling_factor=0), "vae.scaling_factor is 0"),
    (lambda m: m["components"]["unet"].update(files=["/etc/passwd"], engines={"*": "/etc/passwd"}), "'files'"),
], ids=["batch-1e30", "scaling-0", "absolute-file"])
def test_a_damaged_entry_is_refused_before_ray(tiny_entry, tmp_path, capsys, edit, words):
    """Issue 26: serve refuses to start on a damaged entry, with the CLI's one line (no replica ever loads it)."""
    import json
    import shutil

    d = tmp_path / "e"
    shutil.copytree(tiny_entry, d)
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(["serve", "--engine-dir", d], capsys)
    assert code == 2 and "damaged entry" in err and words in err and err.count("\n") == 1, err


def test_replica_error_keeps_the_libraries_one_line_message():
    trace = ("Deploying application default failed: Failed to initialize replica...\nTraceback (most recent call last):\n"
             "  File \"x.py\", line 3, in __init__\nlcm_export.errors.UserError: engine file /e/unet/model.onnx is "
             "corrupt or truncated (InvalidProtobuf); rebuild it\n")
    assert replica_error(trace) == "engine file /e/unet/model.onnx is corrupt or truncated (InvalidProtobuf); rebuild it"
    damaged = "Traceback ...\nlcm_export.errors.DamagedEntry: /e/manifest.json: damaged entry: the manifest's 'batch' is x\n"
    assert replica_error(damaged) == "/e/manifest.json: damaged entry: the manifest's 'batch' is x"
    assert replica_error("RuntimeError: something else\n").startswith("RuntimeError: something else (the replicas' tracebacks")


@pytest.mark.parametrize("threads, cores, replicas, want", [(2, 2, 1, 2.0), (1, 2, 2, 1.0), (1, 2, 3, 0.66), (4, 16, 2, 4.0),
                                                            (2, 3, 2, 1.0)])
def test_replica_cpu_reservation_always_fits_this_machine(threads, cores, replicas, want):
    from lcm_export.serve.server import replica_cpus

    got = replica_cpus(threads, cores, replicas)
    assert got == want and got * replicas <= cores
