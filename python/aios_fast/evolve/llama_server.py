"""Serve a GGUF model over the OpenAI API with llama-cpp-python's server, on 127.0.0.1.

``LlamaServer`` starts ``python -m llama_cpp.server`` as a child process (the bundled
SmolLM2-135M-Instruct GGUF by default), waits until ``/v1/models`` answers, and stops it on
exit (SIGTERM, then SIGKILL after a grace period). It is how the tests, the benchmark and users
without a cloud key get a real OpenAI-compatible teacher::

    with LlamaServer() as srv:
        teacher = OpenAICompatibleProvider(srv.base_url, srv.model)

Needs ``pip install 'llama-cpp-python[server]'`` (compiles llama.cpp, a few minutes).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import BackendUnavailableError, InputError

__all__ = ["LlamaServer", "llama_server_available"]

_SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")


def llama_server_available() -> str | None:
    """``None`` when ``llama_cpp.server`` can run here, else what is missing (for skip reasons)."""
    missing = [m for m in _SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        return (f"llama-cpp-python[server] is not installed (missing {', '.join(missing)}); "
                f"run `pip install 'llama-cpp-python[server]'`")
    return None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LlamaServer:
    """llama-cpp-python's OpenAI-compatible server as a context manager.

    Args:
        gguf: the model file; ``None`` for the bundled SmolLM2-135M-Instruct Q4_1.
        host: interface to bind (loopback by default: the server has no authentication).
        port: TCP port; 0 picks a free one.
        model_alias: the model name clients pass (``.model``).
        n_ctx: context window in tokens.
        n_threads: CPU threads for generation and prompt processing (``None``: llama.cpp's
            default, all cores; on a shared machine fewer threads than cores avoids spinning).
        startup_timeout: seconds to wait for ``/v1/models`` before giving up.

    Attributes ``base_url`` (``http://host:port/v1``), ``model``, ``process`` and ``log_path``
    (the server's combined stdout/stderr, for diagnosing start failures).
    """

    def __init__(self, gguf: str | Path | None = None, host: str = "127.0.0.1", port: int = 0, *,
                 model_alias: str = "smollm2", n_ctx: int = 2048, n_threads: int | None = None,
                 startup_timeout: float = 120.0) -> None:
        if gguf is None:
            from ..bundled import smollm2_gguf

            gguf = smollm2_gguf()
        self.gguf = Path(gguf)
        if not self.gguf.is_file():
            raise InputError(f"GGUF file {self.gguf} does not exist")
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise InputError(f"port must be an int in [0, 65535], got {port!r}")
        if not isinstance(n_ctx, int) or n_ctx < 128:
            raise InputError(f"n_ctx must be an int >= 128, got {n_ctx!r}")
        self.host = host
        self.port = port
        self.model = model_alias
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.startup_timeout = float(startup_timeout)
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self._log = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __repr__(self) -> str:
        state = "running" if self.process is not None and self.process.poll() is None else "stopped"
        return f"LlamaServer(gguf={str(self.gguf)!r}, base_url={self.base_url!r}, {state})"

    def start(self) -> "LlamaServer":
        """Start the server and wait until it answers; raises :class:`BackendUnavailableError`
        if llama-cpp-python[server] is missing or the server does not come up."""
        import httpx

        missing = llama_server_available()
        if missing:
            raise BackendUnavailableError(missing)
        if self.process is not None and self.process.poll() is None:
            return self
        if self.port == 0:
            self.port = _free_port(self.host)
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--host", self.host,
               "--port", str(self.port), "--model_alias", self.model, "--n_ctx", str(self.n_ctx)]
        if self.n_threads:
            cmd += ["--n_threads", str(self.n_threads), "--n_threads_batch", str(self.n_threads)]
        fd, log = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
        self.log_path = Path(log)
        self._log = os.fdopen(fd, "wb")
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.process.poll() is not None:
                tail = self._tail()
                self.stop()
                raise BackendUnavailableError(f"llama-cpp-python server exited with code "
                                              f"{self.process.returncode} while starting: {tail}")
            try:
                r = httpx.get(f"{self.base_url}/models", timeout=2.0)
                if r.status_code == 200 and any(m.get("id") == self.model for m in r.json().get("data", [])):
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                tail = self._tail()
                self.stop()
                raise BackendUnavailableError(f"llama-cpp-python server did not answer {self.base_url}/models "
                                              f"within {self.startup_timeout:.0f} s: {tail}")
            time.sleep(0.2)

    def _tail(self, n: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:].strip() if self.log_path else ""
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after ``grace`` seconds)."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Stop the server and delete its log."""
        self.stop()
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> "LlamaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
