"""Where factory jobs run: in this process, on a local process pool, or as Ray tasks.

Every executor takes the same job dicts (:mod:`aios_fast.factory.jobs`) and returns the same
result dicts in job order, calling ``on_done(index, result)`` as each job finishes (progress
and the journal hang off that callback). Jobs pin their own torch thread count, so the cards
are bit-identical for the same seeds on CPU whichever executor ran them.

- :class:`InlineExecutor`: sequential, in this process, with the caller's already-loaded
  engine (no reload); what tests and single-machine nightly runs with one worker use.
- :class:`LocalExecutor`: ``concurrent.futures.ProcessPoolExecutor`` with the ``spawn`` start
  method (forking a process that holds torch's thread pools is unsafe); each worker loads the
  engine once.
- :class:`RayExecutor`: each job is a Ray task (``ray.remote(num_cpus=..., num_gpus=...)``) on
  an existing cluster (``address``) or a local instance; Ray schedules them by those resource
  requests. Ray is an optional extra (``pip install aios-fast[ray]``).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Protocol, Sequence

from ..errors import AiosError, BackendUnavailableError, InputError
from .jobs import run_job

__all__ = ["Executor", "InlineExecutor", "LocalExecutor", "RayExecutor", "JobFailedError", "make_executor"]

OnDone = Callable[[int, dict[str, Any]], None]


class JobFailedError(AiosError, RuntimeError):
    """A job raised in its worker; the message names the job and the worker's error, ``.job``
    is the job dict and ``__cause__`` the original exception (where it could be carried)."""


class Executor(Protocol):
    name: str

    def map(self, jobs: Sequence[dict[str, Any]], on_done: OnDone | None = None) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


def _fail(job: dict[str, Any], exc: BaseException) -> JobFailedError:
    err = JobFailedError(f"job {job.get('job_id')!r} ({job.get('kind')}) failed: {type(exc).__name__}: {exc}")
    err.job = job
    return err


class InlineExecutor:
    """Runs jobs one after the other in this process."""

    name = "inline"

    def map(self, jobs, on_done=None):
        out = []
        for i, job in enumerate(jobs):
            try:
                r = run_job(job)
            except Exception as exc:  # noqa: BLE001 - re-raised with the job named
                raise _fail(job, exc) from exc
            out.append(r)
            if on_done:
                on_done(i, r)
        return out

    def close(self) -> None:
        pass


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


class LocalExecutor:
    """A pool of ``workers`` spawned processes (default: half the CPUs, at least 1)."""

    name = "local"

    def __init__(self, workers: int | None = None) -> None:
        cpus = os.cpu_count() or 1
        workers = workers if workers is not None else max(1, cpus // 2)
        if not isinstance(workers, int) or workers < 1:
            raise InputError(f"workers: expected an int >= 1, got {workers!r}")
        self.workers = workers
        self._pool = None

    def _get_pool(self):
        if self._pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                             initializer=_init_worker, initargs=(1,))
        return self._pool

    def map(self, jobs, on_done=None):
        from concurrent.futures import as_completed

        pool = self._get_pool()
        futs = {pool.submit(run_job, job): i for i, job in enumerate(jobs)}
        out: list[Any] = [None] * len(jobs)
        try:
            for f in as_completed(futs):
                i = futs[f]
                try:
                    out[i] = f.result()
                except Exception as exc:  # noqa: BLE001
                    raise _fail(jobs[i], exc) from exc
                if on_done:
                    on_done(i, out[i])
        except BaseException:
            for f in futs:
                f.cancel()
            raise
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class RayExecutor:
    """Jobs as Ray tasks.

    Args:
        address: a Ray cluster address (``"ray://host:10001"``, ``"auto"``...); None starts or
            joins a local instance (``num_cpus`` caps it).
        num_cpus / num_gpus: resources each task requests (training on a GPU node: num_gpus=1).
        num_cpus_total: CPUs of a local instance started here (ignored with ``address``).
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, num_cpus: float = 1, num_gpus: float = 0,
                 num_cpus_total: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise BackendUnavailableError("the Ray executor needs ray: pip install 'aios-fast[ray]' "
                                          "(or pip install 'ray>=2.30')") from None
        if num_cpus <= 0 or num_gpus < 0:
            raise InputError(f"RayExecutor: num_cpus must be > 0 and num_gpus >= 0, got {num_cpus}, {num_gpus}")
        self._ray = ray
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self._owns = False
        if not ray.is_initialized():
            # workers import aios_fast the way this process does (a source checkout included)
            env = {k: os.environ[k] for k in ("PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                              "TOKENIZERS_PARALLELISM") if k in os.environ}
            kw: dict[str, Any] = {"runtime_env": {"env_vars": env}, "include_dashboard": False,
                                  "log_to_driver": False}
            if address is None:
                kw["num_cpus"] = num_cpus_total
            ray.init(address=address, **kw)
            self._owns = True
        self._remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)(run_job)

    def map(self, jobs, on_done=None):
        ray = self._ray
        refs = [self._remote.remote(job) for job in jobs]
        index = {r: i for i, r in enumerate(refs)}
        out: list[Any] = [None] * len(jobs)
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                i = index[ready[0]]
                try:
                    out[i] = ray.get(ready[0])
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                    raise _fail(jobs[i], cause) from exc
                if on_done:
                    on_done(i, out[i])
        except BaseException:
            for r in pending:
                ray.cancel(r, force=True)
            raise
        return out

    def close(self) -> None:
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
            self._owns = False


def make_executor(executor: Any = None, *, workers: int | None = None, ray_address: str | None = None,
                  num_gpus: float = 0) -> Any:
    """An executor from a name (``"inline"``, ``"local"``, ``"ray"``), an executor object, or
    None (``"ray"`` when ``ray_address`` is given, else ``"local"``)."""
    if executor is None:
        executor = "ray" if ray_address else "local"
    if not isinstance(executor, str):
        if not hasattr(executor, "map"):
            raise InputError(f"executor: expected 'inline', 'local', 'ray' or an object with .map, got {executor!r}")
        return executor
    if executor == "inline":
        return InlineExecutor()
    if executor == "local":
        return LocalExecutor(workers)
    if executor == "ray":
        return RayExecutor(ray_address, num_gpus=num_gpus, num_cpus_total=workers)
    raise InputError(f"executor: expected 'inline', 'local' or 'ray', got {executor!r}")
