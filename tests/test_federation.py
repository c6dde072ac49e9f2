"""Federation transport, trust and the attack suite: real Flight servers on 127.0.0.1, real
Ed25519 keys, real card files (random factors on MiniLM's module names: transport does not need
a trained card; the Tier 1 end-to-end test in test_federation_e2e.py uses one)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest
import torch

from aios_fast.cards import LoRACard, LoRAFormat
from aios_fast.federation.client import FederationClient
from aios_fast.federation.errors import FederationError, ManifestError, QuarantineError, TrustError
from aios_fast.federation.manager import FederationManager, RemoteSkill
from aios_fast.federation.manifest import Manifest, card_id
from aios_fast.federation.server import CHUNK_SCHEMA, FederationServer, ServerLimits, advertised_host
from aios_fast.federation.tls import TLSConfig, make_test_pki
from aios_fast.federation.trust import Keyring

FP_NODE = "fp1:" + "11" * 16      # the model both test nodes "run"
FP_OTHER = "fp1:" + "22" * 16     # some other base model
TOKEN = "correct-horse-battery"


def make_card(path: Path, name: str = "demo", fp: str | None = FP_NODE, seed: int = 0, layers: int = 2,
              rank: int = 4) -> Path:
    g = torch.Generator().manual_seed(seed)
    keys = [f"encoder.layer.{i}.attention.self.query" for i in range(layers)]
    A = {k: torch.randn(rank, 384, generator=g) for k in keys}
    B = {k: torch.randn(384, rank, generator=g) * 0.01 for k in keys}
    card = LoRACard(name, rank, 2.0 * rank, ["query"], A, B,
                    metadata={"description": f"{name} skill"}, base_fingerprint=fp)
    return LoRAFormat.save(card, path)


def files_under(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def nodes(tmp_path):
    """Two nodes, separate storage and keys, B trusting A's key, static peers."""
    a = FederationManager("alpha", 0, tmp_path / "A", token=TOKEN, discovery=False,
                          base_fingerprint=FP_NODE).start()
    b = FederationManager("beta", 0, tmp_path / "B", token=TOKEN, discovery=False,
                          base_fingerprint=FP_NODE, peers=[a.location]).start()
    b.keyring.trust(a.key.public_hex, "alpha")
    yield a, b
    b.stop()
    a.stop()


# ---------------------------------------------------------------------- manifests and keys
def test_manifest_round_trip_signature_and_strict_parsing(tmp_path):
    kr = Keyring(tmp_path / "keys")
    key = kr.create_key("alice")
    path = make_card(tmp_path / "c.lora.arrow")
    m = Manifest.for_card(path, key, examples=["how do I x?", "what is y?"], version=3)
    assert m.id == hashlib.sha256(path.read_bytes()).hexdigest() == card_id(path)
    assert (m.name, m.version, m.ranks, m.dtypes, m.size) == ("demo", 3, (4,), ("float32",), path.stat().st_size)
    assert m.description == "demo skill" and m.publisher == key.key_id and m.base_fingerprint == FP_NODE
    back = Manifest.from_json(m.to_json())
    assert back == m
    back.verify_signature()
    kr.verify_manifest(back)
    d = json.loads(m.to_json())
    for field, value, expect in [
        ("name", "x" * 129, "at most 128"), ("name", "../etc", "path separators"),
        ("name", "a\x00b", "control"), ("examples", ["q"] * 65, "at most 64"),
        ("examples", ["x" * 1001], "at most 1000"), ("version", True, "integer"),
        ("size", -1, "integer"), ("ranks", [8, 4], "sorted"), ("dtypes", ["int8"], "dtypes"),
        ("base_fingerprint", "../../x", "base_fingerprint"), ("id", "../x", "64 lowercase hex"),
        ("publisher", "0" * 32, "not the id"), ("validation", {"a": {"b": {"c": {"d": {"e": {"f": {}}}}}}}, "nested"),
        ("created", float("inf"), "JSON"),
    ]:
        bad = dict(d, **{field: value})
        try:
            blob = json.dumps(bad).encode()
        except ValueError:
            continue
        with pytest.raises(ManifestError, match=expect):
            Manifest.from_json(blob)
    with pytest.raises(ManifestError, match="unknown"):
        Manifest.from_json(json.dumps(dict(d, extra=1)).encode())
    with pytest.raises(ManifestError, match="over the limit"):
        Manifest.from_json(b" " * (300 << 10))
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.from_json(b"[" * 100000)
    # the signature covers every field: an altered description no longer verifies
    forged = Manifest.from_dict(dict(d, description="now with malware"))
    with pytest.raises(TrustError, match="does not verify"):
        forged.verify_signature()
    # a node never signs a card whose own checksum does not match its content
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / "bad.lora.arrow").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="checksum does not match"):
        Manifest.for_card(tmp_path / "bad.lora.arrow", key)


def test_keyring_create_trust_revoke_persist(tmp_path):
    kr = Keyring(tmp_path / "k")
    own = kr.create_key("me")
    other = Keyring(tmp_path / "o").create_key("them")
    assert kr.is_trusted(own.key_id) and not kr.is_trusted(other.key_id)
    assert oct((tmp_path / "k" / "private" / f"{own.key_id}.pem").stat().st_mode & 0o777) == "0o600"
    kid = kr.trust(other.public_hex, "them")
    assert kid == other.key_id and Keyring(tmp_path / "k").is_trusted(kid)  # persisted
    sig = other.sign(b"hello")
    kr.verify(kid, b"hello", sig)
    with pytest.raises(TrustError, match="does not verify"):
        kr.verify(kid, b"hellO", sig)
    kr.revoke(kid)
    again = Keyring(tmp_path / "k")
    assert not again.is_trusted(kid) and again.get(kid).status == "revoked"
    with pytest.raises(TrustError, match="revoked"):
        again.verify(kid, b"hello", sig)
    with pytest.raises(TrustError, match="revoked"):
        again.trust(other.public_hex)
    assert again.signing_key().key_id == own.key_id
    (tmp_path / "k" / "keyring.json").write_text('{"format": "aios-keyring/1", "keys": {"ab": {}}}')
    with pytest.raises(TrustError, match="corrupt keyring"):
        Keyring(tmp_path / "k")


# ---------------------------------------------------------------------- transport
def test_publish_list_fetch_bytes_identical(nodes, tmp_path):
    a, b = nodes
    path = make_card(tmp_path / "skill.lora.arrow", name="kelp")
    m = a.publish(path, examples=["how do kelp forests grow?"])
    assert a.location.startswith("grpc+tcp://127.0.0.1:") and "0.0.0.0" not in a.location
    remotes = b.scan_remote_skills()
    assert [r.manifest.id for r in remotes] == [m.id] and remotes[0].peer.location == a.location
    got = b.fetch_skill("kelp")   # by name; no library attached -> the admitted file
    assert got.read_bytes() == path.read_bytes()
    assert b.reports[-1]["ok"] and "signature" in b.reports[-1]["reason"]
    assert list(b.quarantine.directory.iterdir()) == []
    assert b.fetch_skill(m.id).read_bytes() == path.read_bytes()  # by id
    # the listing honours the base-model filter
    with FederationClient(a.location, TOKEN) as c:
        assert [x.id for x in c.list(base_fingerprint=FP_NODE)] == [m.id]
        assert c.list(base_fingerprint=FP_OTHER) == []
        assert c.describe(m.id) == m
        assert c.health()["cards"] == 1 and c.health()["key_id"] == a.key_id


def test_fetch_into_library_moves_the_checked_file_and_the_library_still_verifies(nodes, tmp_path):
    """The library takes the quarantine's own file (moved, not copied or hashed again) and still
    loads it with verify=True: a card whose own checksum is wrong, signed by hand by a trusted
    publisher (``Manifest.for_card`` refuses to), passes the quarantine (its bytes are the signed
    ones) and is refused by the library's checksum check; nothing of it is left behind."""
    from dataclasses import replace

    from aios_fast.errors import CardFormatError
    from aios_fast.route.library import SkillLibrary

    a, b = nodes
    lib = SkillLibrary(tmp_path / "lib")
    good = make_card(tmp_path / "good.lora.arrow", name="good")
    m = a.publish(good)
    entry = b.fetch_skill("good", library=lib)
    assert entry.path.read_bytes() == good.read_bytes() and entry.content_hash == m.id == card_id(entry.path)
    assert entry.origin == "peer" and lib.load_card(entry).name == "good"
    umask = os.umask(0o022)
    os.umask(umask)
    assert entry.path.stat().st_mode & 0o777 == 0o666 & ~umask  # as a copy would have been
    assert list(b.quarantine.directory.iterdir()) == []

    bad = make_card(tmp_path / "bad.lora.arrow", name="bad", seed=1)
    honest = Manifest.for_card(bad, a.key)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x01   # a tensor byte: still finite, the card's checksum is now wrong
    bad.write_bytes(bytes(data))
    assert LoRAFormat.inspect(bad)["checksum"] == "mismatch"
    forged = replace(honest, id=card_id(bad)).signed(a.key)
    a.store.add_file(bad, forged)
    with pytest.raises(CardFormatError, match="checksum mismatch"):
        b.fetch_skill(forged.id, library=lib)
    assert b.reports[-1]["ok"] and b.reports[-1]["id"] == forged.id   # the quarantine let it through
    assert lib.find_by_hash(forged.id) is None and lib.names() == ["good"]
    assert list(b.quarantine.directory.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "lib" / "cards").iterdir() if p.suffix == ".arrow") == \
        ["good@v1.lora.arrow"]


def test_revoke_needs_publisher_signature(nodes, tmp_path):
    a, b = nodes
    m = a.publish(make_card(tmp_path / "r.lora.arrow"))
    with FederationClient(a.location, TOKEN) as c:
        with pytest.raises(FederationError, match="not signed by its publisher"):
            c.revoke(m.id, b.key)
        assert c.revoke(m.id, a.key) == {"id": m.id, "revoked": True}
        assert c.list() == []
        # a revoked id cannot be uploaded again
        with pytest.raises(FederationError, match="revoked"):
            c.publish(tmp_path / "r.lora.arrow", m)


def test_bind_wildcard_advertises_reachable_address(tmp_path):
    assert advertised_host("0.0.0.0") not in ("0.0.0.0", "")
    assert advertised_host("0.0.0.0", "10.1.2.3") == "10.1.2.3"
    srv = FederationServer(tmp_path / "s", host="0.0.0.0").serve_in_thread()
    try:
        assert "0.0.0.0" not in srv.location
        host = srv.advertise_host
        with FederationClient(f"grpc+tcp://{host}:{srv.port}") as c:
            assert c.health()["status"] == "ok"   # read-only open server: no token needed to read
            with pytest.raises(FederationError, match="accepts no uploads"):
                m = Manifest.for_card(make_card(tmp_path / "c.lora.arrow"), Keyring(tmp_path / "k").create_key())
                c.publish(tmp_path / "c.lora.arrow", m)
    finally:
        srv.shutdown()


def test_tls_and_mutual_tls(tmp_path):
    pki = make_test_pki(tmp_path / "pki")
    key = Keyring(tmp_path / "k").create_key()
    path = make_card(tmp_path / "c.lora.arrow")
    m = Manifest.for_card(path, key)
    server_tls = TLSConfig(cert=str(pki["server_cert"]), key=str(pki["server_key"]),
                           client_ca=str(pki["ca"]))
    srv = FederationServer(tmp_path / "s", token=TOKEN, tls=server_tls).serve_in_thread()
    try:
        assert srv.location.startswith("grpc+tls://127.0.0.1:")
        good = TLSConfig(ca=str(pki["ca"]), cert=str(pki["client_cert"]), key=str(pki["client_key"]))
        with FederationClient(srv.location, TOKEN, tls=good, timeout=5) as c:
            assert c.publish(path, m)["stored"] is True
            f = c.fetch(m, tmp_path / "q")
            assert f.sha256 == m.id and f.path.read_bytes() == path.read_bytes()
        no_cert = TLSConfig(ca=str(pki["ca"]))
        stranger = TLSConfig(ca=str(pki["ca"]), cert=str(pki["other_cert"]), key=str(pki["other_key"]))
        for tls in (no_cert, stranger):
            with FederationClient(srv.location, TOKEN, tls=tls, timeout=5) as c:
                with pytest.raises(FederationError):
                    c.health()
        with FederationClient(srv.location.replace("grpc+tls", "grpc+tcp"), TOKEN, timeout=5) as c:
            with pytest.raises(FederationError):   # plaintext to a TLS port
                c.health()
    finally:
        srv.shutdown()


# ---------------------------------------------------------------------- the attack suite
def test_attack_put_without_or_with_wrong_token(nodes, tmp_path):
    a, _ = nodes
    path = make_card(tmp_path / "c.lora.arrow")
    m = Manifest.for_card(path, a.key)
    before = files_under(a.storage_dir)
    for token in (None, "wrong-token", TOKEN + "x"):
        with FederationClient(a.location, token) as c:
            with pytest.raises(FederationError, match="Unauthenticated|bearer token"):
                c.publish(path, m)
    assert a.server.refusals["unauthenticated"] == 3 and len(a.store) == 0
    assert files_under(a.storage_dir) == before


@pytest.mark.parametrize("ticket", [b"../x", b"/etc/passwd", b"demo", b"a" * 10_000,
                                    b"../" * 21 + b"x", b"A" * 64, b"0" * 63 + b"/",
                                    b"%2e%2e%2fetc%2fpasswd"],
                         ids=["dotdot", "absolute", "name", "overlong", "traversal64", "upperhex",
                              "slash", "urlencoded"])
def test_attack_tickets_that_are_not_ids(nodes, ticket):
    a, _ = nodes
    raw = flight.FlightClient(a.location)
    opts = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {TOKEN}".encode())], timeout=5)
    with pytest.raises(pa.ArrowInvalid, match="must be a card id"):
        raw.do_get(flight.Ticket(ticket), opts).read_all()
    with pytest.raises(pa.ArrowInvalid, match="must be a card id"):
        raw.get_flight_info(flight.FlightDescriptor.for_command(ticket), opts)
    with pytest.raises(pa.ArrowInvalid, match="not paths"):
        raw.get_flight_info(flight.FlightDescriptor.for_path("etc", "passwd"), opts)
    assert a.server.refusals["bad_id"] == 3  # two ids and one path descriptor
    raw.close()


def test_attack_bytes_flipped_on_server_after_publishing(nodes, tmp_path):
    a, b = nodes
    m = a.publish(make_card(tmp_path / "c.lora.arrow", name="flip"))
    stored = a.store.card_path(m.id)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(QuarantineError, match="rejected at check 'hash'") as err:
        b.fetch_skill("flip")
    assert err.value.check == "hash"
    assert b.reports[-1] == {**b.reports[-1], "ok": False, "check": "hash", "id": m.id}
    assert list(b.quarantine.directory.iterdir()) == []  # deleted
    assert not (b.storage_dir / "fetched").exists()


def test_attack_peer_sends_more_than_the_manifest_says(nodes, tmp_path):
    a, b = nodes
    m = a.publish(make_card(tmp_path / "c.lora.arrow", name="long"))
    with open(a.store.card_path(m.id), "ab") as fh:   # a hostile server streams extra bytes
        fh.write(b"\0" * 100_000)
    with pytest.raises(FederationError, match="sent more than"):
        b.fetch_skill("long")
    assert list(b.quarantine.directory.iterdir()) == []


def test_attack_peer_sends_less_than_the_manifest_says(nodes, tmp_path):
    """A short transfer: refused at 'size' by the quarantine; fetched directly, the file holds
    exactly the bytes received (the blocks reserved for the rest are given back)."""
    a, b = nodes
    m = a.publish(make_card(tmp_path / "c.lora.arrow", name="short", layers=4, rank=64))
    stored = a.store.card_path(m.id)
    stored.write_bytes(stored.read_bytes()[: m.size // 4])
    with pytest.raises(QuarantineError, match="rejected at check 'size'"):
        b.fetch_skill("short")
    assert list(b.quarantine.directory.iterdir()) == []
    with FederationClient(a.location, TOKEN) as c:
        f = c.fetch(m, tmp_path / "q")
    st = f.path.stat()
    assert f.size == st.st_size == m.size // 4 and f.sha256 != m.id
    assert st.st_blocks * 512 < m.size // 2


def test_attack_hostile_listing_is_parsed_strictly_and_bounded(tmp_path):
    """A peer whose listing carries malformed manifests, ones that do not match their
    descriptor, and far too many entries: bad entries are skipped with a reason, the listing is
    cut; a listing that never ends is ended by the client's deadline."""
    key = Keyring(tmp_path / "k").create_key()
    good = Manifest.for_card(make_card(tmp_path / "g.lora.arrow"), key)
    endless = {"on": False}

    class Hostile(FederationServer):
        def list_flights(self, context, criteria):
            def info(cmd: bytes, meta: bytes):
                return flight.FlightInfo(CHUNK_SCHEMA, flight.FlightDescriptor.for_command(cmd), [],
                                         app_metadata=meta)
            yield info(good.id.encode(), good.to_json())
            yield info(good.id.encode(), b'{"format": "aios-manifest/1", "name": "../../etc"}')
            yield info(b"0" * 64, good.to_json())       # descriptor is not the manifest's id
            n = 0
            while (endless["on"] or n < 500) and not context.is_cancelled():
                n += 1
                yield info(good.id.encode(), b"[" * 1000)

    srv = Hostile(tmp_path / "s").serve_in_thread()
    try:
        with FederationClient(srv.location, max_list=50, timeout=10) as c:
            assert c.list() == [good]
            assert any("missing" in p for p in c.problems)
            assert any("not the manifest's id" in p for p in c.problems)
            assert any("not valid JSON" in p for p in c.problems)
            assert c.problems[-1].endswith("listing cut at 50 entries")
        endless["on"] = True
        t0 = time.monotonic()
        with FederationClient(srv.location, timeout=1.5) as c:
            with pytest.raises(FederationError, match="[Dd]eadline|timeout"):
                c.list()
        assert time.monotonic() - t0 < 10
    finally:
        srv.shutdown()


def test_attack_forged_signature_and_untrusted_key(nodes, tmp_path):
    a, b = nodes
    path = make_card(tmp_path / "c.lora.arrow", name="forged")
    m = a.publish(path)
    # a manifest altered after signing (the signature of the original kept)
    forged = Manifest.from_dict({**m.to_dict(), "description": "totally safe", "examples": ["hi"]})
    with FederationClient(a.location, TOKEN) as c:
        with pytest.raises(FederationError, match="does not verify"):
            c.publish(path, forged)   # the server refuses it too
    assert a.server.refusals["bad_manifest"] == 1
    with pytest.raises(QuarantineError, match="'signature'.*does not verify"):
        b.fetch_skill(RemoteSkill(b.peers()[0], forged))
    # a card signed by a key B does not trust (C's)
    c_key = Keyring(tmp_path / "C").create_key("mallory")
    c_path = make_card(tmp_path / "m.lora.arrow", name="mallory", seed=5)
    cm = Manifest.for_card(c_path, c_key)
    with FederationClient(a.location, TOKEN) as c:
        assert c.publish(c_path, cm)["stored"] is True  # A accepts any signed card with the token
    assert {r.manifest.name for r in b.scan_remote_skills()} == {"forged"}  # untrusted: not offered
    assert any("not in keyring" in p for p in b.problems)
    with pytest.raises(QuarantineError, match="'signature'.*not in keyring"):
        b.fetch_skill(RemoteSkill(b.peers()[0], cm))
    # a revoked publisher: A's own cards are refused from now on
    b.keyring.revoke(a.key_id)
    with pytest.raises(QuarantineError, match="revoked"):
        b.fetch_skill(RemoteSkill(b.peers()[0], m))
    assert [r["check"] for r in b.reports[-3:]] == ["signature"] * 3
    assert list(b.quarantine.directory.iterdir()) == []


def test_attack_card_for_another_base_model(nodes, tmp_path):
    a, b = nodes
    m = a.publish(make_card(tmp_path / "c.lora.arrow", name="otherbase", fp=FP_OTHER))
    assert b.scan_remote_skills() == []   # filtered by fingerprint in the listing
    with pytest.raises(QuarantineError, match="'base_model'") as err:
        b.fetch_skill(RemoteSkill(b.peers()[0], m))
    assert err.value.check == "base_model" and b.reports[-1]["check"] == "base_model"


def test_attack_oversized_and_lying_uploads(tmp_path):
    key = Keyring(tmp_path / "k").create_key()
    limits = ServerLimits(max_card_bytes=20_000)
    srv = FederationServer(tmp_path / "store", token=TOKEN, limits=limits).serve_in_thread()
    try:
        big = make_card(tmp_path / "big.lora.arrow", layers=3)
        assert big.stat().st_size > 20_000
        mb = Manifest.for_card(big, key)
        with FederationClient(srv.location, TOKEN) as c:
            with pytest.raises(FederationError, match="over this server's limit"):
                c.publish(big, mb)
        small = make_card(tmp_path / "small.lora.arrow", layers=1, rank=1)
        ms = Manifest.for_card(small, key)
        assert ms.size < 20_000
        raw = flight.FlightClient(srv.location, middleware=[
            __import__("aios_fast.federation.client", fromlist=["x"]).BearerTokenClientFactory(TOKEN)])

        def send(manifest, payload: bytes):
            w, r = raw.do_put(flight.FlightDescriptor.for_command(manifest.to_json()), CHUNK_SCHEMA)
            for off in range(0, len(payload), 4096):
                w.write_batch(pa.record_batch([pa.array([payload[off:off + 4096]], pa.binary())],
                                              schema=CHUNK_SCHEMA))
            w.done_writing()
            r.read()
            w.close()

        # more bytes than the manifest declares: stopped as soon as the size is exceeded
        with pytest.raises(pa.ArrowException, match="larger than its manifest"):
            send(ms, small.read_bytes() + b"\0" * 30_000)
        # right size, other bytes: the recomputed hash does not match the id
        flipped = bytearray(small.read_bytes())
        flipped[-100] ^= 1
        with pytest.raises(pa.ArrowException, match="hashes to"):
            send(ms, bytes(flipped))
        raw.close()
        assert srv.refusals["too_large"] == 2 and srv.refusals["hash_mismatch"] == 1
        assert len(srv.store) == 0
        assert list((tmp_path / "store" / "incoming").iterdir()) == []
        assert list((tmp_path / "store" / "cards").iterdir()) == []
    finally:
        srv.shutdown()


def test_attack_flood_of_list_requests_is_bounded(tmp_path):
    srv = FederationServer(tmp_path / "s", token=TOKEN,
                           limits=ServerLimits(rate=5.0, burst=10)).serve_in_thread()
    try:
        ok = refused = 0
        t0 = time.monotonic()
        with FederationClient(srv.location, TOKEN, timeout=5) as c:
            for _ in range(200):
                try:
                    c.list()
                    ok += 1
                except FederationError as exc:
                    assert "rate limited" in str(exc)
                    refused += 1
            elapsed = time.monotonic() - t0
            assert ok + refused == 200 and refused > 0
            assert ok <= 10 + 5 * elapsed + 1, (ok, elapsed)   # burst + rate x time
            assert srv.refusals["rate_limited"] == refused
            time.sleep(0.5)   # the bucket refills by itself
            c.list()
    finally:
        srv.shutdown()


def test_attack_nothing_written_outside_the_store(nodes, tmp_path):
    """Every attack above against one pair of nodes, then: no file anywhere but in the
    store (A) and nothing left in quarantine (B)."""
    a, b = nodes
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("keep")
    before = files_under(tmp_path)
    raw = flight.FlightClient(a.location)
    opts = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {TOKEN}".encode())], timeout=5)
    for t in (b"../outside/victim.txt", str(outside / "victim.txt").encode(), b"x" * 65):
        with pytest.raises(pa.ArrowInvalid):
            raw.do_get(flight.Ticket(t), opts).read_all()
    for body in (b"../../outside", b'{"id": "../x", "signature": "00"}'):
        with pytest.raises(pa.ArrowException):
            list(raw.do_action(flight.Action("describe" if body[:1] != b"{" else "revoke", body), opts))
    raw.close()
    key = Keyring(tmp_path / "attacker-keys").create_key()
    path = make_card(tmp_path / "evil.lora.arrow", name="evil")
    m = Manifest.for_card(path, key)
    with FederationClient(a.location, "bad") as c:
        with pytest.raises(FederationError):
            c.publish(path, m)
    after = files_under(tmp_path)
    new = {k for k in after if k not in before}
    allowed = ("attacker-keys/", "evil.lora.arrow")
    assert all(k.startswith(allowed) for k in new), sorted(new)
    assert (outside / "victim.txt").read_text() == "keep"
    assert list(b.quarantine.directory.iterdir()) == []
