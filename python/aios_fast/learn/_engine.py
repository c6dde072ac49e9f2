"""One view of what the trainer and the gate need from a model: a SentenceEncoder, a CausalLM,
any object with ``.model`` and ``.tokenizer``, or a ``(model, tokenizer)`` tuple."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

__all__ = ["EngineView", "as_engine", "as_pairs"]


class EngineView:
    """Adapter exposing ``kind`` ("encoder" | "causal"), ``model``, ``tokenizer``, ``device``,
    and the two operations the objectives use: ``embed_texts`` and ``sft_batch``."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        if isinstance(engine, tuple) and len(engine) == 2:
            self.model, self.tokenizer = engine
            self._embed = None
        elif hasattr(engine, "model") and hasattr(engine, "tokenizer"):
            self.model, self.tokenizer = engine.model, engine.tokenizer
            self._embed = getattr(engine, "embed", None)
        else:
            raise InputError("engine must be a SentenceEncoder, a CausalLM, or a (model, tokenizer) "
                             f"tuple; got {type(engine).__name__}")
        if not isinstance(self.model, nn.Module):
            raise InputError(f"engine model must be a torch nn.Module, got {type(self.model).__name__}")
        get_out = getattr(self.model, "get_output_embeddings", None)
        self.kind = "causal" if (get_out is not None and get_out() is not None) else "encoder"
        self.max_length = int(getattr(engine, "max_length", 0) or (256 if self.kind == "encoder" else 512))
        #: texts per length bucket of an encoder forward on a CPU (None: one padded batch); the
        #: trainer sets it for a run from ``TrainConfig.length_buckets``
        self.length_buckets: int | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---------------------------------------------------------------- encoders
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tok = getattr(self.engine, "tokenize", None)
        if tok is not None and self._embed is not None:  # the engine's own (lower-casing etc.)
            dev = self.device  # the trainer may have moved the model off the engine's device
            return {k: v.to(dev) for k, v in tok(list(texts)).items()}
        b = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                           return_tensors="pt")
        return {k: v.to(self.device) for k, v in b.items()}

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled (n, dim) embeddings with gradients: the engine's own ``embed`` (mean pooling for
        MiniLM) or, for a bare model, mean pooling over the attention mask."""
        if self._embed is not None:
            return self._embed(batch)
        out = self.model(**batch)[0]
        m = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
        return (out * m).sum(1) / m.sum(1).clamp_min(1e-9)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Pooled embeddings with gradients, in the order given. With :attr:`length_buckets` set,
        on a CPU the texts are embedded in length-sorted buckets of that many, each padded only to
        its own longest: a contrastive batch pairs short questions with passages of very
        different lengths, and padding every passage to the longest of the batch cost a third of
        a training step (3.3 s -> 2.2 s per step on the demo's passages, 2 cores). Each text's
        embedding does not depend on its batch (the attention mask hides padding), so the loss is
        the same function; only the order in which dropout draws its masks changes."""
        batch = self.tokenize(texts)
        mask = batch["attention_mask"]
        size = self.length_buckets
        right_padded = getattr(self.tokenizer, "padding_side", "right") == "right"
        if size is None or self.device.type != "cpu" or not right_padded or mask.shape[0] <= size:
            return self.embed(batch)   # a GPU pads for free; launches are what cost there
        lens = mask.sum(1)
        order = torch.argsort(lens, stable=True)
        parts = []
        for rows in order.split(size):
            width = int(lens[rows].max())
            parts.append(self.embed({k: v[rows, :width] for k, v in batch.items()}))
        return torch.cat(parts)[torch.argsort(order)]

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """L2-normalised float32 CPU embeddings, in eval mode, no gradients."""
        was = self.model.training
        self.model.eval()
        try:
            outs = [F.normalize(self.embed_texts(texts[i:i + batch_size]).float(), dim=-1).cpu()
                    for i in range(0, len(texts), batch_size)]
        finally:
            self.model.train(was)
        return torch.cat(outs) if outs else torch.zeros(0)

    # ---------------------------------------------------------------- causal models
    def chat_prompt(self, question: str) -> str:
        fn = getattr(self.engine, "chat_prompt", None)
        if fn is not None:
            return fn([{"role": "user", "content": question}])
        return self.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                  add_generation_prompt=True, tokenize=False)

    def sft_batch(self, pairs: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
        """Right-padded batch on the model's device: input_ids, attention_mask, labels."""
        b = sft_batch(self.tokenizer, pairs, self.chat_prompt, self.max_length)
        return {k: v.to(self.device) for k, v in b.items()}

    def token_nll(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token NLL, number of counted tokens) of a batch with ``labels``."""
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        y = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), y.flatten(), ignore_index=-100,
                              reduction="sum")
        return nll, (y != -100).sum()


def sft_ids(tokenizer, question: str, answer: str, chat_prompt: Callable[[str], str],
            max_length: int = 512) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one pair: the chat-templated prompt, then the answer and the
    template's end-of-turn; labels are -100 on prompt tokens (loss on answer tokens only)."""
    tok = tokenizer
    prompt = chat_prompt(question)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    full = None
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": question},
                                        {"role": "assistant", "content": answer}], tokenize=False)
        f_ids = tok(text, add_special_tokens=False)["input_ids"]
        if f_ids[:len(p_ids)] == p_ids and len(f_ids) > len(p_ids):
            full = f_ids
    if full is None:  # template whose full text does not extend the prompt: answer + EOS
        a_ids = tok(answer, add_special_tokens=False)["input_ids"]
        full = p_ids + a_ids + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    full = full[:max_length]
    labels = [-100] * min(len(p_ids), len(full)) + full[len(p_ids):]
    return full, labels


def sft_batch(tokenizer, pairs: Sequence[tuple[str, str]], chat_prompt: Callable[[str], str],
              max_length: int = 512) -> dict[str, torch.Tensor]:
    """Right-padded CPU batch: input_ids, attention_mask, labels (-100 on prompt and padding)."""
    rows = [sft_ids(tokenizer, q, a, chat_prompt, max_length) for q, a in pairs]
    n = max(len(r[0]) for r in rows)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id or 0
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
        mask[i, :len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def as_engine(engine: Any) -> EngineView:
    return engine if isinstance(engine, EngineView) else EngineView(engine)


def as_pairs(pairs: Any, what: str = "pairs") -> list[tuple[str, str]]:
    """Normalise (question, answer) tuples, mappings with query/answer (or question/answer) keys,
    or a pyarrow Table with query/answer columns into a list of string tuples."""
    if hasattr(pairs, "column_names") and hasattr(pairs, "to_pylist"):
        pairs = pairs.to_pylist()
    out = []
    for i, p in enumerate(pairs):
        if isinstance(p, dict):
            q, a = p.get("query", p.get("question")), p.get("answer")
        elif isinstance(p, (tuple, list)) and len(p) == 2:
            q, a = p
        else:
            raise InputError(f"{what}[{i}]: expected a (question, answer) pair or a mapping with "
                             f"'query'/'question' and 'answer', got {p!r:.80}")
        if not isinstance(q, str) or not isinstance(a, str) or not q.strip() or not a.strip():
            raise InputError(f"{what}[{i}]: question and answer must be non-empty strings, got {p!r:.80}")
        out.append((q, a))
    return out
