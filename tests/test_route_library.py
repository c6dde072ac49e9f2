"""SkillLibrary: versions, verbatim copies, atomic index, damage reports, embedding cache."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from aios_fast import CardFormatError, InputError, LoRAFormat
from aios_fast.lora.random import random_card
from aios_fast.route.library import SkillLibrary, encoder_fingerprint

SHAPES = {"encoder.layer.0.attention.self.query": (384, 384),
          "encoder.layer.0.attention.self.value": (384, 384)}


def card(name="cooking", seed=0, **kw):
    return random_card(SHAPES, name=name, rank=4, seed=seed, **kw)


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class CountingEncoder:
    """The real encoder, counting the texts it is asked to embed."""

    def __init__(self, enc, max_length=None):
        self._enc, self.calls, self.texts = enc, 0, 0
        self.model, self.pooling = enc.model, enc.pooling
        self.max_length = max_length or enc.max_length
        self.dim = enc.dim

    def encode(self, texts, **kw):
        self.calls += 1
        self.texts += len(texts)
        return self._enc.encode(texts, **kw)


def test_add_card_and_reopen(tmp_path):
    lib = SkillLibrary(tmp_path / "lib")
    e = lib.add(card(), ["How do I boil an egg?", "  how do I boil   an egg? ", "Best pasta sauce?"],
                "cooking questions")
    assert (e.name, e.version, e.key, e.origin, e.passed) == ("cooking", 1, "cooking@v1", "trained", True)
    assert e.examples == ("How do I boil an egg?", "how do I boil an egg?", "Best pasta sauce?")
    assert e.path.is_file() and e.path.parent == lib.directory / "cards"
    assert e.content_hash == sha(e.path)
    loaded = lib.load_card("cooking")
    assert loaded.equal(LoRAFormat.load(e.path))
    again = SkillLibrary(tmp_path / "lib")
    assert again.list() == [e] and again.problems == []
    assert again.find_by_hash(e.content_hash) == e
    assert again.find_by_hash("0" * 64) is None


def test_index_is_read_through_an_arrow_file_not_a_python_file(tmp_path, monkeypatch):
    """Arrow's I/O threads release the buffers a Python file object returned; one released while
    the interpreter exits takes the GIL after finalisation and aborts the process (SIGABRT,
    "terminate called without an active exception"; apache/arrow#34314, seen in CI as a writer
    of the two-process test dying with -6). The index reader must hand Arrow its own file."""
    lib = SkillLibrary(tmp_path / "lib")
    lib.add(card(), ["How do I boil an egg?"], "cooking questions")
    seen = []
    real = pq.read_table

    def spy(source, *a, **kw):
        seen.append(source)
        return real(source, *a, **kw)

    monkeypatch.setattr(pq, "read_table", spy)
    assert [e.key for e in SkillLibrary(tmp_path / "lib").list()] == ["cooking@v1"]
    assert seen and all(isinstance(s, pa.NativeFile) and not isinstance(s, pa.PythonFile) for s in seen)


def test_path_is_copied_verbatim_and_peer_needs_validation(tmp_path):
    src = tmp_path / "peer.lora.arrow"
    LoRAFormat.save(card("tax", seed=1, metadata={"description": "tax help"}), src)
    lib = SkillLibrary(tmp_path / "lib")
    e = lib.add(src, ["When are taxes due?"], origin="peer")
    assert e.content_hash == sha(src) and e.path.read_bytes() == src.read_bytes()
    assert e.description == "tax help"
    assert e.passed is False                       # a peer's card without a report is not trusted
    assert lib.list() == [] and lib.list(all_versions=True) == [e]
    with pytest.raises(InputError, match="no version that passed"):
        lib.get("tax")
    assert lib.get("tax", 1) == e
    # the same bytes again: the same entry, no new version
    assert lib.add(src, origin="peer") == e


def test_versions_side_by_side_resolve_to_newest_passed(tmp_path):
    lib = SkillLibrary(tmp_path)
    v1 = lib.add(card(seed=1), ["a"], validation={"passed": True, "metric": "recall@1"})
    v2 = lib.add(card(seed=2), ["b"], validation={"passed": True})
    v3 = lib.add(card(seed=3), ["c"], validation={"passed": False, "reasons": ["drift"]})
    assert [e.version for e in lib.versions("cooking")] == [1, 2, 3]
    assert lib.get("cooking") == v2 and lib.get("cooking", 3) == v3 and lib.get("cooking", 1) == v1
    assert lib.list() == [v2]
    lib.remove("cooking", 2)
    assert lib.get("cooking") == v1 and not v2.path.exists()
    v4 = lib.add(card(seed=4), ["d"])
    assert v4.version == 4                         # version numbers are never reused
    lib.remove("cooking")
    assert lib.list(all_versions=True) == [] and not list((tmp_path / "cards").glob("cooking*"))
    with pytest.raises(InputError, match="no skill named 'cooking'"):
        lib.remove("cooking")


def test_validation_defaults_to_the_cards_report(tmp_path):
    c = card(metadata={"validation": json.dumps({"passed": False, "reasons": ["no gain"]})})
    e = SkillLibrary(tmp_path).add(c, ["x"])
    assert e.passed is False and e.validation["reasons"] == ["no gain"]


@pytest.mark.parametrize("kwargs, match", [
    ({"examples": ["ok", ""]}, r"examples\[1\] is empty"),
    ({"examples": "one string"}, "list of strings"),
    ({"examples": ["ok", 3]}, r"examples\[1\] is a int"),
    ({"origin": "cloud"}, "origin must be one of"),
    ({"version": 0}, "version must be an int >= 1"),
    ({"metadata": {"k": 1}}, "metadata must map str -> str"),
    ({"validation": "{not json"}, "not valid JSON"),
], ids=["blank-example", "str-examples", "int-example", "origin", "version", "metadata", "validation"])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, kwargs, match):
    lib = SkillLibrary(tmp_path)
    with pytest.raises(InputError, match=match):
        lib.add(card(), **kwargs)
    assert lib.list(all_versions=True) == []
    assert [p.name for p in (tmp_path / "cards").iterdir()] == []


def test_bad_names_and_files(tmp_path):
    lib = SkillLibrary(tmp_path / "lib")
    with pytest.raises(InputError, match="skill name '../evil' is not allowed"):
        lib.add(card("../evil"))
    with pytest.raises(InputError, match="no such card file"):
        lib.add(tmp_path / "missing.lora.arrow")
    junk = tmp_path / "junk.lora.arrow"
    junk.write_bytes(b"ARROW1\x00\x00" + b"\xff" * 100)
    with pytest.raises(CardFormatError):
        lib.add(junk, origin="peer")
    lib.add(card(), ["x"])
    with pytest.raises(InputError, match="already has version 1"):
        lib.add(card(seed=9), version=1)
    with pytest.raises(InputError, match="known: \\['cooking'\\]"):
        lib.get("nope")
    assert [p.name for p in (tmp_path / "lib" / "cards").iterdir() if p.name.startswith(".")] == []


def test_corrupt_index_is_reported_and_rebuilt(tmp_path):
    lib = SkillLibrary(tmp_path)
    a = lib.add(card("a"), ["x"])
    b = lib.add(card("b", seed=1), ["y"])
    (tmp_path / "index.parquet").write_bytes(b"PAR1 garbage")
    again = SkillLibrary(tmp_path)
    assert any("index" in p and "unreadable" in p for p in again.problems)
    assert again.list() == [a, b]
    assert pq.read_table(tmp_path / "index.parquet").num_rows == 2   # rewritten whole


def test_corrupt_card_is_skipped_with_a_report(tmp_path):
    lib = SkillLibrary(tmp_path)
    good = lib.add(card("good"), ["x"])
    bad = lib.add(card("bad", seed=1), ["y"])
    short = lib.add(card("short", seed=2), ["z"])
    raw = bytearray(bad.path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF                     # same size, different bytes
    bad.path.write_bytes(bytes(raw))
    short.path.write_bytes(short.path.read_bytes()[:-100])
    again = SkillLibrary(tmp_path)
    assert again.list() == [good]
    text = "\n".join(again.problems)
    assert "bad@v1" in text and "content hash" in text
    assert "short@v1" in text and "truncated" in text
    # damage after the library was opened: load_card refuses and records it
    raw = bytearray(good.path.read_bytes())
    raw[-200] ^= 0x01
    good.path.write_bytes(bytes(raw))
    with pytest.raises(CardFormatError, match="changed or damaged"):
        again.load_card("good")
    assert any("good@v1" in p for p in again.problems)


def test_embeddings_are_cached_per_encoder(tmp_path, encoder):
    counting = CountingEncoder(encoder)
    lib = SkillLibrary(tmp_path, encoder=counting)
    lib.add(card("a"), ["How do I boil an egg?", "Best pasta sauce?"])
    lib.add(card("b", seed=1), ["When are taxes due?"])
    assert counting.texts == 3                     # each skill embedded once, when added
    E = lib.embed_texts(["How do I boil an egg?", "When are taxes due?"])
    assert counting.texts == 3 and E.shape == (2, 384) and E.dtype.name == "float32"
    torch.testing.assert_close(torch.from_numpy(E), encoder.encode(["How do I boil an egg?",
                                                                  "When are taxes due?"]))
    fresh = CountingEncoder(encoder)
    SkillLibrary(tmp_path, encoder=fresh).embed_texts(["Best pasta sauce?"])
    assert fresh.calls == 0                        # read from the on-disk cache
    other = CountingEncoder(encoder, max_length=64)   # another embedding function
    assert encoder_fingerprint(other) != encoder_fingerprint(fresh)
    SkillLibrary(tmp_path, encoder=other).embed_texts(["Best pasta sauce?"])
    assert other.texts == 1                        # re-embedded, never mixed


_WRITER = textwrap.dedent("""
    import sys
    from aios_fast.lora.random import random_card
    from aios_fast.route.library import SkillLibrary
    lib = SkillLibrary(sys.argv[1])
    shapes = {"encoder.layer.0.attention.self.query": (384, 384)}
    for i in range(4):
        lib.add(random_card(shapes, name=f"{sys.argv[2]}{i}", rank=2, seed=i), [f"text {i}"])
""")


@pytest.mark.slow  # two fresh interpreters import torch: ~20 s on a loaded 2-core machine
def test_two_processes_add_without_losing_rows_and_readers_never_see_half(tmp_path):
    lib_dir = tmp_path / "lib"
    SkillLibrary(lib_dir)
    env_py = [sys.executable, "-c", _WRITER, str(lib_dir)]
    procs = [subprocess.Popen(env_py + [prefix]) for prefix in ("p", "q")]
    reads = 0
    try:
        while any(p.poll() is None for p in procs):
            try:
                # one open handle, as the library reads it: the inode it names is complete
                fh = pa.OSFile(str(lib_dir / "index.parquet"), "rb")
            except FileNotFoundError:
                continue
            with fh:
                pq.read_table(fh)   # never a partial file
            reads += 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0, 0]
    names = [e.name for e in SkillLibrary(lib_dir).list()]
    assert names == sorted(f"{p}{i}" for p in "pq" for i in range(4))
    assert reads > 0
