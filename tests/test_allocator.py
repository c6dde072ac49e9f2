"""aios_fast.allocator: glibc keeps freed large blocks for reuse instead of unmapping them.

The behaviour test runs in child processes: the setting is process-wide and cannot be undone,
and a fresh process gives both sides the same starting heap."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from aios_fast import allocator
from aios_fast.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# 48 MiB float32 tensors allocated, written and freed 12 times: above glibc's largest adaptive
# mmap threshold (32 MiB), so by default every round maps and faults in 12 288 fresh pages
CHILD = r"""
import json, resource, sys
import torch
from aios_fast.allocator import keep_large_blocks
setting = keep_large_blocks()
# warm-up, not counted: a freed aligned block is a few bytes short of the next aligned request,
# so the heap may grow by a block for several rounds (where depends on ASLR) until freed
# neighbours coalesce; it was steady by round 7 in every run seen
for _ in range(12):
    x = torch.empty(12 << 20); x.fill_(1.0); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(12):
    x = torch.empty(12 << 20); x.fill_(1.0); del x
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"faults": after - before, "setting": setting}))
"""
PAGES_PER_ROUND = (48 << 20) // os.sysconf("SC_PAGE_SIZE")


def _child(**env) -> dict:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", allocator.ENV)}
    base["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), base.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", CHILD], env={**base, **env}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture()
def fresh_state(monkeypatch):
    monkeypatch.setattr(allocator, "_state", {"applied": False, "threshold": None, "reason": "fresh"})


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only exists on glibc Linux")
def test_large_blocks_are_reused_instead_of_faulted_in_again():
    default = _child(**{allocator.ENV: "system"})
    kept = _child()
    assert default["setting"]["applied"] is False and "system" in default["setting"]["reason"]
    assert kept["setting"] == {"applied": True, "threshold": 256 << 20,
                               "reason": "blocks up to 256 MiB reused from the heap"}
    # glibc's default: each round's 48 MiB comes back as fresh zero pages
    assert default["faults"] >= 0.9 * 12 * PAGES_PER_ROUND, default
    # kept: the same block is handed out again; what faults remain are Python's small change
    assert kept["faults"] < 0.05 * PAGES_PER_ROUND, kept


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only exists on glibc Linux")
def test_a_threshold_below_the_block_size_keeps_faulting():
    """The threshold is what decides: 16 MiB leaves the 48 MiB blocks to mmap."""
    small = _child(**{allocator.ENV: "16"})
    assert small["setting"]["threshold"] == 16 << 20
    assert small["faults"] >= 0.9 * 12 * PAGES_PER_ROUND, small


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only exists on glibc Linux")
def test_users_own_glibc_settings_are_left_alone():
    got = _child(MALLOC_MMAP_THRESHOLD_="131072")
    assert got["setting"]["applied"] is False
    assert "MALLOC_MMAP_THRESHOLD_" in got["setting"]["reason"]
    assert got["faults"] >= 0.9 * 12 * PAGES_PER_ROUND, got


def test_the_setting_is_not_applied_on_import():
    out = subprocess.run([sys.executable, "-c", "import aios_fast.allocator as a, json; "
                          "import aios_fast.bench.machine; print(json.dumps(a.malloc_setting()))"],
                         env={**os.environ, "PYTHONPATH": str(ROOT / "python")}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["applied"] is False


@pytest.mark.parametrize("env, reason", [
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, "GLIBC_TUNABLES"),
    ({"MALLOC_TRIM_THRESHOLD_": "1"}, "MALLOC_TRIM_THRESHOLD_"),
    ({allocator.ENV: "SYSTEM"}, "glibc's defaults kept"),
])
def test_no_op_cases_say_why(fresh_state, env, reason):
    got = allocator.keep_large_blocks(env=env)
    assert got["applied"] is False and reason in got["reason"]
    assert allocator.malloc_setting() == got


def test_system_outranks_an_explicit_threshold(fresh_state, monkeypatch):
    monkeypatch.setattr(allocator, "_mallopt", lambda: pytest.fail("mallopt must not be called"))
    got = allocator.keep_large_blocks(64 << 20, env={allocator.ENV: "system"})
    assert got == {"applied": False, "threshold": None, "reason": "AIOS_FAST_MALLOC=system: glibc's defaults kept"}


def test_not_glibc_is_a_no_op(fresh_state, monkeypatch):
    monkeypatch.setattr(allocator, "_mallopt", lambda: None)
    got = allocator.keep_large_blocks(env={})
    assert got == {"applied": False, "threshold": None,
                   "reason": "not glibc: the C library's allocator is left as it is"}


@pytest.mark.parametrize("value", ["lots", "0", "-5", "4096", "1.5"])
def test_bad_environment_value_is_named(fresh_state, value):
    with pytest.raises(InputError, match=rf"AIOS_FAST_MALLOC='{value}'.*'system' or a threshold in MiB from 1 to 1024"):
        allocator.keep_large_blocks(env={allocator.ENV: value})


@pytest.mark.parametrize("value", [0, 1 << 19, (1 << 30) + 1, 2.5, True, "256"])
def test_bad_threshold_argument_is_named(fresh_state, value):
    with pytest.raises(InputError, match="threshold: expected bytes from 1 MiB to 1 GiB"):
        allocator.keep_large_blocks(value, env={})


def _cli(args: list[str], **extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", allocator.ENV)}
    env["PYTHONPATH"] = str(ROOT / "python")
    code = f"import sys; from aios_fast.cli import main; sys.exit(main({args!r}))"
    out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr
    return out


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only exists on glibc Linux")
def test_cli_applies_it_only_when_asked_and_the_bench_report_records_it(tmp_path):
    _cli(["bench", "--quick", "--only", "gpu", "--out", str(tmp_path / "a"), "--no-progress"],
         **{allocator.ENV: "256"})
    machine = json.loads((tmp_path / "a" / "report.json").read_text())["machine"]
    assert machine["malloc"] == {"applied": True, "threshold": 256 << 20,
                                 "reason": "blocks up to 256 MiB reused from the heap"}
    assert "- glibc malloc: blocks up to 256 MiB reused from the heap" in (tmp_path / "a" / "report.md").read_text()
    _cli(["bench", "--quick", "--only", "gpu", "--out", str(tmp_path / "b"), "--no-progress"])
    machine = json.loads((tmp_path / "b" / "report.json").read_text())["machine"]
    assert machine["malloc"] == {"applied": False, "threshold": None,
                                 "reason": "glibc's defaults (AIOS_FAST_MALLOC unset)"}


def test_cli_reports_it_and_refuses_a_bad_value():
    assert json.loads(_cli(["info", "--json"], **{allocator.ENV: "64"}).stdout)["malloc"]["threshold"] == (
        (64 << 20) if GLIBC else None)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python"), allocator.ENV: "plenty"}
    out = subprocess.run([sys.executable, "-c", "import sys; from aios_fast.cli import main; sys.exit(main(['info']))"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "aios-fast info: error: AIOS_FAST_MALLOC='plenty': expected 'system' or a threshold in MiB" in out.stderr


def test_from_environment_is_a_no_op_without_the_variable(fresh_state, monkeypatch):
    monkeypatch.setattr(allocator, "_mallopt", lambda: pytest.fail("mallopt must not be called"))
    assert allocator.from_environment(env={}) == {
        "applied": False, "threshold": None, "reason": "glibc's defaults (AIOS_FAST_MALLOC unset)"}
