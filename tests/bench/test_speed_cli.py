"""`ember bench` on CPU: the JSON line carries the keys the benchmark files need (strict JSON: no NaN), and
the table for people names what was measured."""
import json

import pytest

from ember.cli import main
from tests.models.tiny import write_tiny

KEYS = {"model", "bpw", "batch", "device", "prompt_len", "gen_len", "prefill_tok_s", "decode_tok_s", "vram_gib",
        "roofline_frac"}


def _reject(value):
    raise ValueError(f"not strict JSON: {value}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    write_tiny("llama3.1", path)
    return str(path)


def test_bench_json_line(folder, capsys, monkeypatch):
    args = ["bench", "--model", folder, "--device", "cpu", "--prompt-len", "12", "--gen-len", "3", "--reps", "1"]
    assert main([*args, "--json", "-q"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1], parse_constant=_reject)
    assert KEYS <= row.keys()
    assert row["device"] == "cpu" and row["prompt_len"] == 12 and row["gen_len"] == 3 and row["bpw"] == 16
    assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 and row["prefill_graph"] is False
    assert row["ember_fuse"] == 1 and row["ember_h2"] == 1  # the kernel switches of the run
    assert row["dtype"] == "float32" and row["ember_gemv_stages"] == 1  # CPU default; no A/B switch set
    assert row["ember_async_decode"] == 1  # default: the pipelined decode loop (runner.launch / collect)
    assert row["ember_even_n"] == 0
    monkeypatch.setenv("EMBER_FUSE", "0")
    monkeypatch.setenv("EMBER_ASYNC_DECODE", "0")  # one step, then its read
    assert main([*args, "--json", "-q"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["ember_fuse"] == 0 and row["ember_async_decode"] == 0 and row["decode_tok_s"] > 0
    assert main([*args, "--max-seq-len", "4096", "--json", "-q"]) == 0  # block tables of the engine's capacity
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["max_seq_len"] == 4096 and row["decode_tok_s"] > 0
    assert main([*args, "-q"]) == 0
    out = capsys.readouterr().out
    assert "prefill" in out and "decode" in out and "tok/s" in out and "{" not in out
