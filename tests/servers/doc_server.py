"""A static document server on 127.0.0.1 for grounding tests: serves given pages (body,
content type, status, extra headers) by path, counts hits, and can stream a body slowly
or announce no Content-Length (so a size limit must be enforced while reading)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["Page", "DocServer"]


@dataclass(frozen=True)
class Page:
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    chunked: bool = False      # no Content-Length: stream the body in 64 KiB pieces
    delay: float = 0.0         # seconds to wait before answering


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        with srv.lock:
            srv.hits[self.path] = srv.hits.get(self.path, 0) + 1
        page = srv.pages.get(self.path)
        if page is None:
            page = Page(b"not found", "text/plain", 404)
        if page.delay:
            srv.closing.wait(page.delay)
        try:
            self.send_response(page.status)
            self.send_header("Content-Type", page.content_type)
            for k, v in page.headers:
                self.send_header(k, v)
            if page.chunked:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(0, len(page.body), 65536):
                    piece = page.body[i:i + 65536]
                    self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            else:
                self.send_header("Content-Length", str(len(page.body)))
                self.end_headers()
                self.wfile.write(page.body)
        except OSError:  # the client stopped reading (size limit, timeout)
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:
        # a client that gives up mid-reply (timeouts, size limits: what the tests provoke) is
        # expected; keep the error for inspection instead of printing a traceback to stderr
        import sys

        self.errors = getattr(self, "errors", []) + [repr(sys.exc_info()[1])]


class DocServer:
    """``with DocServer({"/a.html": Page(b"<html>...")}) as srv: srv.url("/a.html")``."""

    def __init__(self, pages: dict[str, Page]) -> None:
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.pages = dict(pages)
        self._httpd.hits = {}
        self._httpd.lock = threading.Lock()
        self._httpd.closing = threading.Event()
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="doc-server")

    def url(self, path: str) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    @property
    def hits(self) -> dict[str, int]:
        with self._httpd.lock:
            return dict(self._httpd.hits)

    def __enter__(self) -> "DocServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
