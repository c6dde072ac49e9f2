"""Grounding: chunking, a folder of documents, pages fetched from a real local HTTP server, and
search with the bundled MiniLM returning the passage that answers a question."""

from __future__ import annotations

import re

import pytest
from servers.doc_server import DocServer, Page

from aios_fast.errors import InputError
from aios_fast.evolve.retrieval import DocumentIndex, Passage, chunk_text

# three documents of a fictional town, each about something else
FERRY = """# The Quillmarsh ferry

The Quillmarsh ferry crosses the Ostrel estuary every forty minutes between six in the morning
and ten at night. Tickets are bought from the green kiosk on Pier 3 or from the conductor on
board. Bicycles travel free, but cargo bikes need a separate freight token.

In winter storms the harbour master may suspend the crossing. Suspensions are announced on the
siren tower with three long blasts.
"""
BEES = """Keeping bees in Quillmarsh

Every hive inside the town wall must be registered with the Apiary Office before the first of
April. Registration costs twelve crowns per hive and is renewed each spring. Keepers must place
hives at least five metres from a public path. The office inspects hives for varroa mites twice a
year, in May and in September.
"""
BAKERY = """The Ostrel loaf

The Ostrel loaf is a rye bread baked with caraway and dark treacle. The dough rests overnight in a
cold cellar and is baked in a wood-fired oven at dawn. Bakers in Quillmarsh sell it by weight, and
a half loaf keeps for a week wrapped in linen.
"""


@pytest.fixture()
def docs(tmp_path):
    (tmp_path / "ferry.md").write_text(FERRY)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bees.txt").write_text(BEES)
    (tmp_path / "bakery.txt").write_text(BAKERY)
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # not a document: ignored
    return tmp_path


# ------------------------------------------------------------------------------ chunking
def test_chunks_keep_whole_sentences_and_overlap():
    sentences = [f"Sentence number {i} talks about topic {i % 3} in some detail." for i in range(40)]
    chunks = chunk_text(" ".join(sentences), chunk_chars=200, overlap=60)
    assert len(chunks) > 5
    assert all(len(c) <= 200 for c in chunks)
    for c in chunks:  # every chunk is a run of whole sentences
        assert re.fullmatch(r"(Sentence number \d+ talks about topic \d in some detail\. ?)+", c), c
    for a, b in zip(chunks, chunks[1:]):  # consecutive chunks share their boundary sentence
        assert a.split(". ")[-1].rstrip(".") in b
    assert "Sentence number 39" in chunks[-1]


def test_chunk_splits_an_overlong_sentence_and_validates():
    long = "word " * 500
    chunks = chunk_text(long, chunk_chars=100, overlap=0)
    assert all(len(c) <= 100 for c in chunks) and sum(c.count("word") for c in chunks) == 500
    with pytest.raises(InputError, match="chunk_chars"):
        chunk_text("x", chunk_chars=10)
    with pytest.raises(InputError, match="overlap"):
        chunk_text("x", chunk_chars=100, overlap=80)


def test_markdown_is_flattened():
    chunks = chunk_text("# Title\n\nSee [the docs](http://x.y/z) for **bold** text.\n\n```\ncode()\n```\n",
                        markdown=True)
    assert chunks == ["Title See the docs for bold text."]  # heading kept as context, code dropped


# ------------------------------------------------------------------------------ folder
def test_folder_grounding_and_search(encoder, docs):
    index = DocumentIndex(encoder, chunk_chars=300, overlap=60)
    n = index.add_folder(docs)
    assert n == len(index.passages) >= 3
    srcs = {s["source"].rsplit("/", 1)[-1]: s for s in index.sources}
    assert set(srcs) == {"ferry.md", "bees.txt", "bakery.txt"}
    assert srcs["ferry.md"]["kind"] == "markdown" and len(srcs["bees.txt"]["hash"]) == 64
    for p in index.passages:  # stable ids derived from the source's content hash
        assert p.id.startswith(p.source_hash[:12] + ":")
        assert index.get(p.id) is p

    cases = {
        "how much does it cost to register a beehive?": "bees.txt",
        "when does the boat across the river stop running?": "ferry.md",
        "what kind of bread is made with caraway?": "bakery.txt",
    }
    for question, expected in cases.items():
        (best, score), *rest = index.search(question, k=3)
        assert best.source.endswith(expected), (question, best)
        assert score > rest[0][1] if rest else True
    hits = index.search(["do I pay for my bike on the ferry?", "bike ticket"], k=2)
    assert hits[0][0].source.endswith("ferry.md") and "Bicycles travel free" in hits[0][0].text
    assert -1.0 <= hits[1][1] <= hits[0][1] <= 1.0


def test_same_content_is_not_added_twice_and_ids_are_stable(encoder, docs):
    a, b = DocumentIndex(encoder), DocumentIndex(encoder)
    a.add_folder(docs)
    assert a.add_folder(docs) == 0 and len(a.sources) == 3
    b.add_folder(docs)
    assert [p.id for p in a.passages] == [p.id for p in b.passages]
    assert a.add_text(BAKERY, "bakery again") == 0  # same bytes as bakery.txt: already there
    assert a.add_text(BAKERY + "Sold on Fridays.", "bakery v2") == 1  # new content -> new source
    assert a.add_text(BAKERY + "Sold on Fridays.", "bakery v2") == 0


def test_folder_errors_are_clear(encoder, tmp_path):
    index = DocumentIndex(encoder, max_file_bytes=100)
    with pytest.raises(InputError, match="does not exist"):
        index.add_folder(tmp_path / "missing")
    with pytest.raises(InputError, match="holds no readable document: no .txt"):
        index.add_folder(tmp_path)
    (tmp_path / "big.txt").write_text("x" * 500)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("A short readable note about the harbour.")
    assert index.add_folder(tmp_path) == 1
    assert any("big.txt: skipped, 500 bytes is more than max_file_bytes=100" in p for p in index.problems)
    assert any("latin1.txt: skipped" in p and "not UTF-8" in p for p in index.problems)


def test_pdf_is_read(encoder, tmp_path):
    pytest.importorskip("pypdf", reason="the pdf extra (pypdf) is not installed")
    (tmp_path / "notice.pdf").write_bytes(_tiny_pdf("The ferry pier closes at midnight."))
    index = DocumentIndex(encoder)
    assert index.add_folder(tmp_path) == 1
    assert index.passages[0].text == "The ferry pier closes at midnight."
    assert index.sources[0]["kind"] == "pdf"


def _tiny_pdf(text: str) -> bytes:
    """A one-page PDF with ``text`` in Helvetica, with a correct cross-reference table."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
            b"/Resources << /Font << /F1 5 0 R >> >> >>",
            b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


# ------------------------------------------------------------------------------ URLs
def _html(title: str, body: str) -> bytes:
    nav = "".join(f"<li><a href='/p{i}'>Menu item {i}</a></li>" for i in range(8))
    paras = "".join(f"<p>{p}</p>" for p in body.strip().split("\n\n"))
    return (f"<html><head><title>{title}</title></head><body><nav><ul>{nav}</ul></nav>"
            f"<article><h1>{title}</h1>{paras}</article><footer>Copyright Quillmarsh council</footer>"
            f"</body></html>").encode()


@pytest.fixture()
def site():
    pages = {
        "/ferry.html": Page(_html("The Quillmarsh ferry", FERRY.split("\n", 2)[2])),
        "/bees.txt": Page(BEES.encode(), "text/plain; charset=utf-8"),
        "/old-bees": Page(b"", status=301, headers=(("Location", "/bees.txt"),)),
        "/loop": Page(b"", status=302, headers=(("Location", "/loop"),)),
        "/big.html": Page(_html("Big", "word " * 200_000)),
        "/big-streamed.html": Page(_html("Big", "word " * 200_000), chunked=True),
        "/logo.png": Page(b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "image/png"),
        "/slow.html": Page(_html("Slow", "A slow page."), delay=3.0),
        "/latin1.html": Page("<html><head><meta charset='iso-8859-1'></head><body><article><p>Le caf\u00e9 du "
                             "port ouvre \u00e0 six heures et ferme \u00e0 minuit, tous les jours de la semaine "
                             "sauf le lundi.</p></article></body></html>".encode("latin-1"), "text/html"),
        "/empty.html": Page(b"<html><body><script>var x = 1;</script><div></div></body></html>"),
    }
    with DocServer(pages) as srv:
        yield srv


def test_url_grounding_and_search(encoder, site):
    index = DocumentIndex(encoder, chunk_chars=400, overlap=80)
    n = index.add_urls([site.url("/ferry.html"), site.url("/old-bees")])
    assert n == len(index.passages) >= 2
    kinds = {s["source"].rsplit("/", 1)[-1]: s for s in index.sources}
    assert kinds["ferry.html"]["kind"] == "html"
    assert kinds["old-bees"]["kind"] == "url-text" and kinds["old-bees"]["final_url"].endswith("/bees.txt")
    text = " ".join(p.text for p in index.passages if p.source.endswith("ferry.html"))
    assert "every forty minutes" in text and "Menu item" not in text and "Copyright" not in text
    best, _ = index.search("Which office registers hives?", k=1)[0]
    assert best.source.endswith("/old-bees") and "Apiary Office" in best.text


@pytest.mark.parametrize("path, message", [
    pytest.param("/big.html", r"bytes is more than max_bytes=100000", id="oversize-declared"),
    pytest.param("/big-streamed.html", r"body is more than max_bytes=100000", id="oversize-streamed"),
    pytest.param("/logo.png", r"content type 'image/png' is not HTML or text", id="wrong-type"),
    pytest.param("/loop", r"too many redirects", id="redirect-loop"),
    pytest.param("/missing", r"HTTP 404", id="not-found"),
    pytest.param("/slow.html", r"no answer within timeout=0.5 s", id="timeout"),
    pytest.param("/empty.html", r"no main text found", id="no-text"),
])
def test_url_limits(encoder, site, path, message):
    index = DocumentIndex(encoder)
    with pytest.raises(InputError, match=message) as err:
        index.add_urls(site.url(path), max_bytes=100_000, timeout=0.5, max_redirects=3)
    assert site.url(path) in str(err.value)
    assert len(index) == 0


def test_html_charset_from_meta(encoder, site):
    index = DocumentIndex(encoder)
    assert index.add_urls(site.url("/latin1.html")) == 1
    assert "Le café du port ouvre à six heures" in index.passages[0].text


def test_failed_urls_are_noted_when_others_succeed(encoder, site):
    index = DocumentIndex(encoder)
    assert index.add_urls([site.url("/logo.png"), site.url("/bees.txt")]) >= 1
    assert len(index.problems) == 1 and "image/png" in index.problems[0]
    with pytest.raises(InputError, match="not an http"):
        index.add_urls("file:///etc/passwd")


def test_search_validates_and_empty_index(encoder):
    index = DocumentIndex(encoder)
    assert index.search("anything") == []
    with pytest.raises(InputError, match="queries"):
        index.search([])
    with pytest.raises(InputError, match="k must be"):
        index.search("x", k=0)
    with pytest.raises(InputError, match="encode"):
        DocumentIndex(object())
    assert Passage("abc:0", "t", "s", "abc") == Passage("abc:0", "t", "s", "abc")
