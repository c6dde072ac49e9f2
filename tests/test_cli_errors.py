"""Every subcommand of the foundation's CLI (info, probe, card, extract, train, qa) refuses bad
arguments with a clear one-line error naming the argument (or file) and what was expected, and
an exit status (2 for argparse errors, 1 for refused input), never a traceback. The cases fail
before any model loads, so the whole file runs in a few seconds."""

from __future__ import annotations

import re

import pytest

from aios_fast.cli import main

# (argv with {tmp} for the test's directory, exit status, regex the error must contain)
CASES = [
    ("info --bogus", 2, r"unrecognized arguments: --bogus"),
    ("probe --file {tmp}/missing.txt", 2, r"argument --file: no such file: .*missing\.txt"),
    ("probe --baseline-file {tmp}/missing.txt", 2, r"argument --baseline-file: no such file"),
    ("probe --file {tmp}/empty.txt", 1, r"--file .*empty\.txt: no non-empty lines"),
    ("probe --file {tmp}/latin1.txt", 1, r"--file .*latin1\.txt: not UTF-8 text"),
    ("probe --top 0", 2, r"argument --top: expected an int >= 1, got '0'"),
    ("probe --batch-size x", 2, r"argument --batch-size: expected an int >= 1, got 'x'"),
    ("probe --max-length 1", 2, r"argument --max-length: expected an int >= 2"),
    ("probe --model {tmp}/nomodel", 1, r"model directory .*nomodel does not exist"),
    ("card inspect {tmp}/missing.lora.arrow", 1, r"missing\.lora\.arrow: no such file"),
    ("card inspect {tmp}/garbage.lora.arrow", 1, r"garbage\.lora\.arrow: file is \d+ bytes, too short"),
    ("card convert {tmp}/missing.lora.arrow {tmp}/o.lora.arrow", 1, r"missing\.lora\.arrow: no such file"),
    ("card convert {tmp} {tmp}/o.lora.arrow", 1, r"not a PEFT adapter directory"),
    ("card convert {tmp}/garbage.lora.arrow {tmp}/o --to v9", 2, r"argument --to: invalid choice: 'v9'"),
    ("card", 2, r"required: VERB"),
    ("extract --base a --tuned b --out c --power-iters x", 2,
     r"argument --power-iters: expected 'auto' or an int >= 0, got 'x'"),
    ("extract --base a --tuned b --out c --rank 0", 2, r"argument --rank: expected an int >= 1, got '0'"),
    ("extract --base a --tuned b --out c --energy 1.5", 2, r"argument --energy: expected a finite number in \(0, 1\]"),
    ("extract --base a --tuned b --out c --energy nan", 2, r"argument --energy: expected a finite number"),
    ("extract --base a --tuned b --out c --workers 0", 2, r"argument --workers: expected an int >= 1"),
    ("extract --base a --tuned b --out c --oversample -1", 2, r"argument --oversample: expected an int >= 0"),
    ("extract --base a --tuned b --out c --alpha -2", 2, r"argument --alpha: expected a finite number in \(0"),
    ("extract --base a --tuned b --out c --heat-map {tmp}/missing.parquet --budget 4", 2,
     r"argument --heat-map: no such file"),
    ("extract --base a --tuned b --out c --heat-map {tmp}/empty.txt", 1, r"--heat-map and --budget go together"),
    ("extract --base {tmp}/nobase --tuned {tmp}/notuned --out {tmp}/c.lora.arrow", 1,
     r"--tuned: .*notuned does not exist"),
    ("extract --base {tmp}/nobase --tuned {tmp}/notuned --out {tmp}", 1, r"--out .*: is a directory"),
    ("extract --tuned b --out c", 2, r"the following arguments are required: --base"),
    ("train --guard {tmp}/missing.txt", 2, r"argument --guard: no such file: .*missing\.txt"),
    ("train --pairs {tmp}/missing.jsonl", 2, r"argument --pairs: no such file"),
    ("train --heldout {tmp}/missing.jsonl", 2, r"argument --heldout: no such file"),
    ("train --pairs {tmp}/bad.jsonl", 1, r"--pairs .*bad\.jsonl:1: not JSON"),
    ("train --pairs {tmp}/latin1.txt", 1, r"--pairs .*latin1\.txt: not UTF-8 text"),
    ("train --guard {tmp}/empty.txt", 1, r"--guard .*empty\.txt: no non-empty lines"),
    ("train --out {tmp}", 1, r"--out .*: is a directory"),
    ("train --rank 0", 2, r"argument --rank: expected an int >= 1, got '0'"),
    ("train --epochs -1", 2, r"argument --epochs: expected an int >= 1"),
    ("train --lr 0", 2, r"argument --lr: expected a finite number in \(0, inf\)"),
    ("train --lr inf", 2, r"argument --lr: expected a finite number"),
    ("train --batch-size 1", 2, r"argument --batch-size: expected an int >= 2"),
    ("train --max-drift -0.1", 2, r"argument --max-drift: expected a finite number in \[0"),
    ("train --objective rl", 2, r"argument --objective: invalid choice: 'rl'"),
    ("qa import {tmp}/missing.jsonl --log {tmp}/log", 2, r"argument file: no such file: .*missing\.jsonl"),
    ("qa import {tmp}/bad.jsonl --log {tmp}/log", 1, r"FILE .*bad\.jsonl"),
    ("qa import {tmp}/bad.jsonl --log {tmp}/bad.jsonl", 1, r"--log .*bad\.jsonl: is a file"),
    ("qa export --log {tmp}/nolog {tmp}/o.jsonl", 1, r"--log .*nolog: no such log directory"),
    ("qa export --log {tmp} {tmp}/o.jsonl --since yesterday", 1, r"--since: expected .*ISO-8601.*'yesterday'"),
    ("qa stats --log {tmp}/nolog", 1, r"--log .*nolog: no such log directory"),
    ("qa import", 2, r"the following arguments are required: file, --log"),
]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "garbage.lora.arrow").write_bytes(b"garbage")
    (tmp_path / "bad.jsonl").write_text("not json\n")
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    return tmp_path


@pytest.mark.parametrize("argv, status, message", CASES, ids=[c[0].split(" {")[0][:60] for c in CASES])
def test_bad_arguments_give_a_clear_error(files, capsys, argv, status, message):
    args = argv.format(tmp=files).split()
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    # any other exception propagates and fails the test: that is a traceback for a user
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert rc == status, err
    assert re.search(message, err), f"expected /{message}/ in:\n{err}"
    last = err.strip().splitlines()[-1]
    assert last.startswith(("aios-fast", "usage:")) and "error" in last, last
