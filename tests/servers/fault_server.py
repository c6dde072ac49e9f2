"""A real OpenAI-compatible HTTP server on 127.0.0.1 whose replies are scripted per request,
to test a teacher client against the faults real servers produce.

Each POST to ``/v1/chat/completions`` (or ``/chat/completions``) takes the next :class:`Fault`
from the script (then repeats ``default``) and answers with it:

* ``ok(content)``: a valid chat-completion JSON with ``content`` as the assistant's message;
* ``garbage(body)``: HTTP 200 with a non-JSON body;
* ``stall(seconds)``: waits (past the client's timeout), then answers ``ok``;
* ``rate_limited(retry_after)``: HTTP 429 with a ``Retry-After`` header;
* ``status(code, body)``: any status with a JSON error body;
* ``drop()``: sends headers announcing a longer body, half a body, then closes the socket;
* ``reject_format(ok_content)``: HTTP 400 when the request has ``response_format``, else ``ok``.

Every request is recorded (time, path, headers, parsed JSON body) in ``server.requests``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Fault", "FaultServer", "ok", "garbage", "stall", "rate_limited", "status", "drop", "reject_format",
           "completion_json"]


@dataclass(frozen=True)
class Fault:
    kind: str
    content: str = ""
    seconds: float = 0.0
    code: int = 200
    body: bytes = b""


def ok(content: str) -> Fault:
    return Fault("ok", content=content)


def garbage(body: bytes = b"<html>502 Bad Gateway? no: \x00\xff garbage</html>") -> Fault:
    return Fault("garbage", body=body)


def stall(seconds: float, content: str = "late") -> Fault:
    return Fault("stall", content=content, seconds=seconds)


def rate_limited(retry_after: float | str = 1) -> Fault:
    return Fault("429", content=str(retry_after), code=429)


def status(code: int, message: str = "error") -> Fault:
    return Fault("status", code=code,
                 body=json.dumps({"error": {"message": message, "type": "server_error"}}).encode())


def drop() -> Fault:
    return Fault("drop")


def reject_format(content: str) -> Fault:
    return Fault("reject_format", content=content)


def completion_json(content: str, model: str = "fault-model", prompt_tokens: int = 11,
                    completion_tokens: int | None = None) -> bytes:
    """A minimal valid OpenAI chat-completion body."""
    ct = completion_tokens if completion_tokens is not None else max(1, len(content) // 4)
    return json.dumps({
        "id": "chatcmpl-fault", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": ct,
                  "total_tokens": prompt_tokens + ct},
    }).encode()


@dataclass
class Recorded:
    t: float
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class _State:
    script: list[Fault] = field(default_factory=list)
    default: Fault = field(default_factory=lambda: ok("[]"))
    requests: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closing: threading.Event = field(default_factory=threading.Event)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/json", headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._send(200, json.dumps({"object": "list", "data": [
                {"id": "fault-model", "object": "model", "owned_by": "tests"}]}).encode())
        else:
            self._send(404, b'{"error": {"message": "not found"}}')

    def do_POST(self) -> None:
        state = self.server.state
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
        with state.lock:
            state.requests.append(Recorded(time.monotonic(), self.path,
                                           {k.lower(): v for k, v in self.headers.items()}, body))
            fault = state.script.pop(0) if state.script else state.default
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, b'{"error": {"message": "not found"}}')
            return
        kind = fault.kind
        if kind == "ok":
            self._send(200, completion_json(fault.content))
        elif kind == "garbage":
            self._send(200, fault.body, ctype="text/plain")
        elif kind == "stall":
            state.closing.wait(fault.seconds)
            try:
                self._send(200, completion_json(fault.content))
            except OSError:  # the client gave up and closed the socket
                pass
        elif kind == "429":
            self._send(429, b'{"error": {"message": "rate limited", "type": "rate_limit"}}',
                       headers={"Retry-After": fault.content})
        elif kind == "status":
            self._send(fault.code, fault.body)
        elif kind == "drop":
            body = completion_json("this reply will be cut")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # socket.SHUT_RDWR: the client sees the body end early
        elif kind == "reject_format":
            if isinstance(body, dict) and "response_format" in body:
                self._send(400, b'{"error": {"message": "response_format is not supported"}}')
            else:
                self._send(200, completion_json(fault.content))
        else:  # pragma: no cover - a typo in a test script
            self._send(500, json.dumps({"error": {"message": f"unknown fault {kind}"}}).encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:
        # a client that gives up mid-reply (timeouts, size limits: what the tests provoke) is
        # expected; keep the error for inspection instead of printing a traceback to stderr
        import sys

        self.errors = getattr(self, "errors", []) + [repr(sys.exc_info()[1])]
    state: _State


class FaultServer:
    """Context manager: ``with FaultServer() as srv: srv.script(ok("..."), rate_limited(1)); srv.base_url``."""

    def __init__(self) -> None:
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.state = _State()
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="fault-server")

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def requests(self) -> list[Recorded]:
        with self._httpd.state.lock:
            return list(self._httpd.state.requests)

    def script(self, *faults: Fault, default: Fault | None = None) -> "FaultServer":
        """Replace the script (and optionally the default reply once it is used up)."""
        st = self._httpd.state
        with st.lock:
            st.script = list(faults)
            if default is not None:
                st.default = default
            st.requests.clear()
        return self

    def start(self) -> "FaultServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (idempotent): stalled handlers are released, the port is closed."""
        if self._httpd.state.closing.is_set():
            return
        self._httpd.state.closing.set()  # release stalled handlers
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> "FaultServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
