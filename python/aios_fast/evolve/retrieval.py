"""Grounding: documents a node can read (a local folder, fetched URLs, given text), cut into
passages and searched with the node's own sentence encoder.

Passages are sentence-aware windows (sentences packed up to ``chunk_chars``, consecutive
passages sharing about ``overlap`` characters of whole sentences), the usual dense-retrieval
unit (Karpukhin et al. 2020, "Dense Passage Retrieval", 100-word passages). Each passage has a
stable id ``f"{source_hash[:12]}:{i}"`` (the SHA-256 of the source's bytes and the passage's
index), so generated pairs can name the passages they came from across runs.

Search embeds the queries and scores every passage with one matrix product; several queries
(a topic) score a passage by its best match among them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import urlsplit

import torch

from ..errors import InputError

__all__ = ["Passage", "DocumentIndex", "chunk_text", "TEXT_SUFFIXES", "HTML_TYPES", "TEXT_TYPES"]

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
HTML_TYPES = ("text/html", "application/xhtml+xml")
TEXT_TYPES = ("text/plain", "text/markdown", "text/x-markdown")

# a sentence ends at . ! ? (optionally followed by a closing quote/bracket) before whitespace
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_MD_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_MD_NOISE = re.compile(r"^\s{0,3}(#{1,6}\s+|>\s?|[-*+]\s+|\d+[.)]\s+)|[*_`]{1,3}", re.M)


@dataclass(frozen=True)
class Passage:
    """A retrievable piece of a document.

    ``id`` is ``f"{source_hash[:12]}:{i}"`` (stable while the source's bytes are unchanged),
    ``source`` the file path or URL, ``source_hash`` the hex SHA-256 of the source's bytes.
    """

    id: str
    text: str
    source: str
    source_hash: str


# --------------------------------------------------------------------------------- chunking
def _sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s and s.strip()]


def _split_long(sentence: str, limit: int) -> list[str]:
    """Cut a sentence longer than ``limit`` at whitespace (hard cut if it has none)."""
    out, rest = [], sentence
    while len(rest) > limit:
        cut = rest.rfind(" ", 0, limit + 1)
        cut = cut if cut > limit // 2 else limit
        out.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        out.append(rest)
    return out


def _plain(text: str, markdown: bool) -> str:
    if markdown:
        text = _MD_LINK.sub(r"\1", text)
        text = re.sub(r"```.*?```", " ", text, flags=re.S)  # code blocks are not prose
        text = _MD_NOISE.sub("", text)
    return text


def chunk_text(text: str, chunk_chars: int = 800, overlap: int = 160, *, markdown: bool = False) -> list[str]:
    """Cut ``text`` into passages of whole sentences, at most ``chunk_chars`` long (a longer
    sentence is cut at whitespace), consecutive passages sharing up to ``overlap`` characters of
    whole sentences. Paragraphs (blank lines) and Markdown headings are sentence breaks;
    ``markdown=True`` strips link targets, emphasis and code blocks first."""
    if not isinstance(chunk_chars, int) or chunk_chars < 50:
        raise InputError(f"chunk_chars must be an int >= 50, got {chunk_chars!r}")
    if not isinstance(overlap, int) or not 0 <= overlap < chunk_chars // 2:
        raise InputError(f"overlap must be an int in [0, chunk_chars/2), got {overlap!r} for chunk_chars={chunk_chars}")
    text = _plain(text, markdown)
    units: list[str] = []
    for para in re.split(r"\n\s*\n|\n(?=\s{0,3}#)", text):
        para = " ".join(para.split())
        for s in _sentences(para):
            units.extend(_split_long(s, chunk_chars))
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    fresh = False  # does `current` hold a sentence not already in the previous chunk?
    for s in units:
        if current and size + 1 + len(s) > chunk_chars:
            chunks.append(" ".join(current))
            # carry whole trailing sentences (up to `overlap` chars) into the next passage
            carry: list[str] = []
            c = 0
            for prev in reversed(current):
                if c + len(prev) + 1 > overlap:
                    break
                carry.insert(0, prev)
                c += len(prev) + 1
            if c + len(s) + 1 > chunk_chars:
                carry, c = [], 0
            current, size = carry, c
        current.append(s)
        size += len(s) + (1 if size else 0)
        fresh = True
    if current and fresh:
        chunks.append(" ".join(current))
    return chunks


# ----------------------------------------------------------------------------------- readers
def _read_pdf(path: Path) -> str:
    from pypdf import PdfReader

    reader = PdfReader(str(path))
    return "\n\n".join((page.extract_text() or "") for page in reader.pages)


def _decode(data: bytes, charset: str | None, where: str) -> str:
    for enc in ([charset] if charset else []) + ["utf-8"]:
        try:
            return data.decode(enc)
        except (UnicodeDecodeError, LookupError):
            continue
    raise InputError(f"{where} is not UTF-8 text{f' (nor {charset})' if charset else ''}")


class DocumentIndex:
    """Passages from documents, embedded with ``encoder`` and searched by meaning.

    Args:
        encoder: anything with ``encode(list[str]) -> (n, d)`` L2-normalised embeddings
            (``SentenceEncoder``; the node's encoder, so grounding and routing agree).
        chunk_chars: longest passage, in characters (MiniLM reads 256 tokens, ~1000 chars).
        overlap: characters of whole sentences shared by consecutive passages.
        max_file_bytes: larger local files are skipped (recorded in :attr:`problems`).

    Adding is cheap; embeddings are computed for new passages on the next :meth:`search`.
    A source whose bytes were already added (same SHA-256) is not added twice.
    Thread-safe.
    """

    def __init__(self, encoder: Any, *, chunk_chars: int = 800, overlap: int = 160,
                 max_file_bytes: int = 20_000_000) -> None:
        if not hasattr(encoder, "encode"):
            raise InputError(f"encoder must have an encode(texts) method (e.g. SentenceEncoder), "
                             f"got {type(encoder).__name__}")
        chunk_text("probe.", chunk_chars, overlap)  # validates both
        if not isinstance(max_file_bytes, int) or max_file_bytes < 1:
            raise InputError(f"max_file_bytes must be a positive int, got {max_file_bytes!r}")
        self.encoder = encoder
        self.chunk_chars = chunk_chars
        self.overlap = overlap
        self.max_file_bytes = max_file_bytes
        self._passages: list[Passage] = []
        self._by_id: dict[str, Passage] = {}
        self._sources: list[dict] = []
        self._hashes: set[str] = set()
        self._emb: torch.Tensor | None = None  # rows for the first len(_emb) passages
        self._lock = threading.RLock()
        #: human-readable notes on files/URLs that were skipped, and why
        self.problems: list[str] = []

    # ------------------------------------------------------------------ properties
    @property
    def passages(self) -> list[Passage]:
        with self._lock:
            return list(self._passages)

    @property
    def sources(self) -> list[dict]:
        """One dict per added source: ``source`` (path or URL), ``hash`` (hex SHA-256 of its
        bytes), ``kind`` (``text``/``markdown``/``pdf``/``html``/``url-text``), ``passages``
        (count), and ``final_url`` for URLs that redirected."""
        with self._lock:
            return [dict(s) for s in self._sources]

    def __len__(self) -> int:
        return len(self._passages)

    def get(self, passage_id: str) -> Passage:
        """The passage with this id; :class:`InputError` if unknown."""
        try:
            return self._by_id[passage_id]
        except KeyError:
            raise InputError(f"no passage with id {passage_id!r} in this index") from None

    def __repr__(self) -> str:
        return f"DocumentIndex(sources={len(self._sources)}, passages={len(self._passages)})"

    # ------------------------------------------------------------------ adding
    def add_text(self, text: str, source: str, *, kind: str = "text", source_hash: str | None = None,
                 extra: dict | None = None) -> int:
        """Chunk ``text`` and add its passages under ``source`` (a name, path or URL). The hash is
        the SHA-256 of ``text`` (UTF-8) unless given. Returns the number of passages added
        (0 if the same content was added before)."""
        if not isinstance(text, str):
            raise InputError(f"text for source {source!r} must be a string, got {type(text).__name__}")
        if not isinstance(source, str) or not source:
            raise InputError(f"source must be a non-empty string naming the document, got {source!r}")
        digest = source_hash or hashlib.sha256(text.encode("utf-8")).hexdigest()
        chunks = chunk_text(text, self.chunk_chars, self.overlap, markdown=kind == "markdown")
        with self._lock:
            if digest in self._hashes:
                return 0
            self._hashes.add(digest)
            for i, chunk in enumerate(chunks):
                p = Passage(id=f"{digest[:12]}:{i}", text=chunk, source=source, source_hash=digest)
                self._passages.append(p)
                self._by_id[p.id] = p
            self._sources.append({"source": source, "hash": digest, "kind": kind, "passages": len(chunks),
                                  **(extra or {})})
        return len(chunks)

    def add_folder(self, path: str | Path, *, recursive: bool = True) -> int:
        """Add every ``.txt``/``.md``/``.markdown``/``.rst`` file under ``path`` (and ``.pdf`` when
        ``pypdf`` is installed: ``pip install aios-fast[pdf]``), in sorted order. Unreadable,
        oversize or non-UTF-8 files are skipped and noted in :attr:`problems`.

        Returns the number of passages added. Raises :class:`InputError` if ``path`` is not a
        directory, or holds no readable document."""
        root = Path(path)
        if not root.is_dir():
            raise InputError(f"docs folder {root} does not exist or is not a directory")
        has_pdf = importlib.util.find_spec("pypdf") is not None
        files = sorted(p for p in (root.rglob("*") if recursive else root.iterdir()) if p.is_file())
        added = readable = 0
        problems: list[str] = []
        for f in files:
            suffix = f.suffix.lower()
            if suffix not in TEXT_SUFFIXES and suffix != ".pdf":
                continue
            if suffix == ".pdf" and not has_pdf:
                problems.append(f"{f}: skipped, reading PDF needs pypdf (pip install 'aios-fast[pdf]')")
                continue
            try:
                size = f.stat().st_size
                if size > self.max_file_bytes:
                    problems.append(f"{f}: skipped, {size} bytes is more than max_file_bytes={self.max_file_bytes}")
                    continue
                data = f.read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                if suffix == ".pdf":
                    text, kind = _read_pdf(f), "pdf"
                else:
                    text = _decode(data, None, str(f))
                    kind = "markdown" if suffix in (".md", ".markdown") else "text"
            except InputError as exc:
                problems.append(f"{f}: skipped, {exc}")
                continue
            except Exception as exc:  # an unreadable file or a broken PDF must not stop the folder
                problems.append(f"{f}: skipped, {type(exc).__name__}: {exc}")
                continue
            if not text.strip():
                problems.append(f"{f}: skipped, no text in it")
                continue
            readable += 1
            added += self.add_text(text, str(f), kind=kind, source_hash=digest)
        with self._lock:
            self.problems.extend(problems)
        if readable == 0:
            detail = ("; ".join(problems)) if problems else \
                f"no {'/'.join(TEXT_SUFFIXES)}{'/.pdf' if has_pdf else ''} files"
            raise InputError(f"docs folder {root} holds no readable document: {detail}")
        return added

    def add_urls(self, urls: str | Sequence[str], *, max_bytes: int = 2_000_000, timeout: float = 10.0,
                 max_redirects: int = 5, client: Any = None) -> int:
        """Fetch pages with ``httpx`` and add their text: HTML through ``trafilatura`` (main text,
        no boilerplate), ``text/plain``/``text/markdown`` as is.

        Limits: http(s) only; at most ``max_bytes`` per body (checked on ``Content-Length`` and
        while streaming); ``timeout`` seconds per connect/read; at most ``max_redirects``
        redirects; other content types are refused. A URL that fails is noted in
        :attr:`problems`; :class:`InputError` (listing every failure) if none could be added.
        Returns the number of passages added.
        """
        import httpx

        if isinstance(urls, str):
            urls = [urls]
        urls = list(urls)
        if not urls or not all(isinstance(u, str) for u in urls):
            raise InputError(f"urls must be one or more URL strings, got {urls!r:.100}")
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise InputError(f"max_bytes must be a positive int, got {max_bytes!r}")
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise InputError(f"timeout must be a positive number of seconds, got {timeout!r}")
        own = client is None
        if own:
            client = httpx.Client(follow_redirects=True, max_redirects=max_redirects,
                                  timeout=httpx.Timeout(timeout),
                                  headers={"User-Agent": "aios-fast/0.1 (+grounding)",
                                           "Accept": "text/html, text/plain;q=0.9, text/markdown;q=0.9"})
        added = fetched = 0
        problems: list[str] = []
        try:
            for url in urls:
                try:
                    text, kind, digest, final = self._fetch(client, url, max_bytes, timeout)
                except InputError as exc:
                    problems.append(str(exc))
                    continue
                fetched += 1
                extra = {"final_url": final} if final != url else None
                added += self.add_text(text, url, kind=kind, source_hash=digest, extra=extra)
        finally:
            if own:
                client.close()
        with self._lock:
            self.problems.extend(problems)
        if fetched == 0:
            raise InputError("no URL could be added: " + "; ".join(problems))
        return added

    @staticmethod
    def _fetch(client: Any, url: str, max_bytes: int, timeout: float) -> tuple[str, str, str, str]:
        import httpx

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InputError(f"{url}: not an http(s) URL")
        try:
            with client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise InputError(f"{url}: HTTP {resp.status_code}, expected 200")
                ctype = resp.headers.get("content-type", "")
                mime = ctype.split(";")[0].strip().lower()
                if mime not in HTML_TYPES + TEXT_TYPES:
                    raise InputError(f"{url}: content type {mime or 'missing'!r} is not HTML or text "
                                     f"(accepted: {', '.join(HTML_TYPES + TEXT_TYPES)})")
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise InputError(f"{url}: {declared} bytes is more than max_bytes={max_bytes}")
                buf = bytearray()
                for chunk in resp.iter_bytes():
                    buf += chunk
                    if len(buf) > max_bytes:
                        raise InputError(f"{url}: body is more than max_bytes={max_bytes} bytes")
                charset = resp.charset_encoding
                final = str(resp.url)
        except httpx.TooManyRedirects:
            raise InputError(f"{url}: too many redirects") from None
        except httpx.TimeoutException:
            raise InputError(f"{url}: no answer within timeout={timeout} s") from None
        except httpx.HTTPError as exc:
            raise InputError(f"{url}: fetch failed ({type(exc).__name__}: {exc})") from None
        data = bytes(buf)
        digest = hashlib.sha256(data).hexdigest()
        if mime in HTML_TYPES:
            import trafilatura

            try:
                html: str | bytes = _decode(data, charset, url)
            except InputError:  # no usable header charset: trafilatura reads <meta charset> itself
                html = data
            text = trafilatura.extract(html, url=final, include_comments=False, include_tables=True,
                                       favor_recall=True)
            kind = "html"
            if not text or not text.strip():
                raise InputError(f"{url}: no main text found in the HTML")
        else:
            text, kind = _decode(data, charset, url), ("markdown" if "markdown" in mime else "url-text")
            if not text.strip():
                raise InputError(f"{url}: the page is empty")
        return text, kind, digest, final

    # ------------------------------------------------------------------ search
    def _embeddings(self) -> torch.Tensor:
        with self._lock:
            have = 0 if self._emb is None else self._emb.shape[0]
            if have < len(self._passages):
                new = self._encode([p.text for p in self._passages[have:]])
                self._emb = new if self._emb is None else torch.cat([self._emb, new])
            return self._emb

    def _encode(self, texts: list[str]) -> torch.Tensor:
        out = self.encoder.encode(texts)
        emb = torch.as_tensor(out).detach().to("cpu", torch.float32)
        if emb.ndim != 2 or emb.shape[0] != len(texts):
            raise InputError(f"encoder returned shape {tuple(emb.shape)} for {len(texts)} texts; expected (n, d)")
        return torch.nn.functional.normalize(emb, dim=1)  # cosine even if the encoder does not normalise

    def search(self, queries: str | Sequence[str], k: int = 8) -> list[tuple[Passage, float]]:
        """The ``k`` passages most similar to ``queries`` (cosine), best first, as
        ``(passage, score)``. Several queries score a passage by their best match. An empty
        index returns ``[]``."""
        if isinstance(queries, str):
            queries = [queries]
        queries = list(queries)
        if not queries or not all(isinstance(q, str) and q.strip() for q in queries):
            raise InputError(f"queries must be one or more non-empty strings, got {queries!r:.100}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise InputError(f"k must be a positive int, got {k!r}")
        P = self._embeddings()
        if P is None or P.shape[0] == 0:
            return []
        Q = self._encode(queries)
        if Q.shape[1] != P.shape[1]:
            raise InputError(f"query embeddings have {Q.shape[1]} dims, passages {P.shape[1]}: "
                             f"the encoder changed since the passages were embedded")
        scores = (Q @ P.T).max(dim=0).values  # one matrix product: (queries x passages)
        top = torch.topk(scores, min(k, scores.shape[0]))
        with self._lock:
            return [(self._passages[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]

    def texts(self, ids: Iterable[str]) -> list[str]:
        """The texts of the passages with these ids."""
        return [self.get(i).text for i in ids]
