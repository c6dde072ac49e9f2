"""The trainer's default recipe: per-objective defaults, duplicate-free contrastive batches,
hard negatives mined with the base encoder, the symmetric in-batch-negatives loss and the
learning-rate schedule.

Why each part (measured on the tuning sets in ``learn/data``; figures in BENCHMARKS.md):

- **No duplicate answers in a batch.** In-batch negatives (Henderson et al. 2017, "Efficient
  Natural Language Response Suggestion"; sentence-transformers' MultipleNegativesRankingLoss)
  treat every other answer of the batch as wrong. When two questions of a batch share an
  answer, or have near-identical ones, the loss pushes the question away from its own answer.
  :func:`plan_batches` never puts two pairs of one answer group in a batch (the idea of
  sentence-transformers' ``NoDuplicatesBatchSampler``); :func:`answer_groups` joins exact
  duplicates (case, spacing and punctuation aside) and answers whose base-encoder cosine is at
  least ``near_duplicate``.
- **Hard negatives** (Karpukhin et al. 2020, "Dense Passage Retrieval"; Xiong et al. 2021,
  ANCE): for each question, the answers of OTHER groups that the base encoder ranks highest,
  appended as extra columns of the logits. Off by default unless measured to pay.
- **Group masking.** A logit whose column belongs to the row's own answer group (other than the
  positive) is masked out, so a hard negative that happens to be another row's positive, or a
  paraphrase of the row's own answer, is never taught as wrong.
- **Symmetric loss** (CLIP, Radford et al. 2021): the mean of question→answer and
  answer→question cross-entropies.
- **Schedule**: linear warm-up over ``warmup_ratio`` of the steps, then linear (or cosine) decay
  to zero (Goyal et al. 2017 warm-up; the schedule sentence-transformers uses by default).
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError

__all__ = ["OBJECTIVE_DEFAULTS", "SCHEDULES", "BATCHING", "resolve_defaults", "answer_groups",
           "plan_batches", "mine_hard_negatives", "contrastive_loss", "lr_factor", "ContrastiveData"]

#: Linear layers adapted by default for the contrastive objective: every attention projection
#: and the feed-forward layers of the usual encoder families (BERT/MiniLM, DistilBERT, Llama-
#: style), never a pooler. A regex searched in the full module key (``select_modules``' rule).
ENCODER_ALL_LINEAR = (r"^(?!.*pooler).*\.(query|key|value|dense|q_proj|k_proj|v_proj|o_proj|"
                      r"q_lin|k_lin|v_lin|out_lin|lin1|lin2|gate_proj|up_proj|down_proj)$")

#: The defaults each objective resolves ``None`` fields to (chosen by the measurements quoted
#: in BENCHMARKS.md, "Trainer recipe"). ``target_modules`` None keeps the query/value default of
#: :func:`aios_fast.learn._inject.resolve_targets`.
OBJECTIVE_DEFAULTS: dict[str, dict[str, Any]] = {
    "contrastive": dict(rank=8, alpha=16.0, target_modules=ENCODER_ALL_LINEAR, epochs=5, lr=3e-3,
                        schedule="linear", warmup_ratio=0.1, max_grad_norm=1.0, batching="unique",
                        hard_negatives=0, symmetric=False),
    "sft": dict(rank=8, alpha=16.0, target_modules=None, epochs=2, lr=1e-2, schedule="linear",
                warmup_ratio=0.1, max_grad_norm=1.0, batching="random", hard_negatives=0,
                symmetric=False),
}
SCHEDULES = ("constant", "linear", "cosine")
BATCHING = ("unique", "random", "grouped")


def resolve_defaults(cfg: Any) -> None:
    """Fill the ``None`` fields of a TrainConfig from :data:`OBJECTIVE_DEFAULTS` (in place)."""
    for key, value in OBJECTIVE_DEFAULTS[cfg.objective].items():
        if getattr(cfg, key, None) is None:
            setattr(cfg, key, value)


# ----------------------------------------------------------------------------- batching
_PUNCT = re.compile(r"[\W_]+", re.UNICODE)


def _norm(text: str) -> str:
    return _PUNCT.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def answer_groups(answers: Sequence[str], embeddings: torch.Tensor | None = None,
                  near_duplicate: float = 0.95) -> list[int]:
    """Group id per answer: equal after case/spacing/punctuation normalisation, or (with
    ``embeddings``, L2-normalised rows) cosine >= ``near_duplicate``; groups are transitive.

    Returns:
        one int per answer, the same for answers of one group (ids are 0..n_groups-1).
    """
    n = len(answers)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)

    first: dict[str, int] = {}
    for i, a in enumerate(answers):
        union(i, first.setdefault(_norm(a), i))
    if embeddings is not None and n > 1:
        if embeddings.shape[0] != n:
            raise InputError(f"embeddings: expected {n} rows (one per answer), got {embeddings.shape[0]}")
        sims = embeddings.float() @ embeddings.float().T
        ii, jj = torch.nonzero(torch.triu(sims >= near_duplicate, diagonal=1), as_tuple=True)
        for i, j in zip(ii.tolist(), jj.tolist()):
            union(i, j)
    roots: dict[int, int] = {}
    return [roots.setdefault(find(i), len(roots)) for i in range(n)]


def plan_batches(groups: Sequence[int], batch_size: int, epochs: int, generator: torch.Generator,
                 batching: str = "unique") -> list[list[int]]:
    """Index batches for all epochs, each of exactly ``batch_size`` (the ragged rest dropped:
    in-batch negatives need the size).

    ``"random"``: a fresh permutation per epoch cut into batches (the plain recipe).
    ``"unique"``: per epoch, each batch takes one pair (in a fresh random order) from each of
    the ``batch_size`` groups with the most pairs left, so no group appears twice in a batch and
    as few pairs as possible are left over. When fewer groups than ``batch_size`` exist, the
    batch size is the number of groups.
    ``"grouped"``: per epoch, the groups in a fresh random order are cut into
    ``round(n_groups / batch_size)`` batches of (nearly) ``batch_size`` groups, and a batch holds
    EVERY pair of its groups: each answer is encoded once per batch for all its questions
    (:meth:`ContrastiveData.loss`), and no pair is left over. Batches differ in size.
    """
    n = len(groups)
    if batching not in BATCHING:
        raise InputError(f"batching: expected one of {BATCHING}, got {batching!r}")
    plan: list[list[int]] = []
    if batching == "grouped":
        members: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        keys = list(members)
        n_batches = max(1, round(len(keys) / batch_size))
        for _ in range(epochs):
            order = [keys[j] for j in torch.randperm(len(keys), generator=generator).tolist()]
            for b in range(n_batches):
                chunk = order[b * len(keys) // n_batches:(b + 1) * len(keys) // n_batches]
                plan.append([i for g in chunk for i in members[g]])
        return plan
    if batching == "random":
        bs = min(batch_size, n)
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator).tolist()
            plan += [order[s * bs:(s + 1) * bs] for s in range(n // bs)]
        return plan
    bs = min(batch_size, len(set(groups)))
    for _ in range(epochs):
        buckets: dict[int, list[int]] = {}
        for i in torch.randperm(n, generator=generator).tolist():
            buckets.setdefault(groups[i], []).append(i)
        while True:
            live = [g for g, items in buckets.items() if items]
            if len(live) < bs:  # the pairs left share too few groups to fill a batch
                break
            # groups with the most pairs left go first (random among equals): spreading the
            # often-asked answers over the batches loses the fewest pairs to the rule
            tie = torch.rand(len(live), generator=generator).tolist()
            order = sorted(range(len(live)), key=lambda j: (-len(buckets[live[j]]), tie[j]))
            plan.append([buckets[live[j]].pop() for j in order[:bs]])
    return plan


@torch.no_grad()
def mine_hard_negatives(q_emb: torch.Tensor, a_emb: torch.Tensor, groups: Sequence[int],
                        k: int) -> torch.Tensor:
    """(n, k) indices of each question's ``k`` most similar answers from OTHER groups.

    Args:
        q_emb, a_emb: L2-normalised base-encoder embeddings of the n questions and n answers.
        groups: answer group per pair (:func:`answer_groups`); the true answer's group is excluded.
    """
    g = torch.as_tensor(list(groups))
    sims = q_emb.float() @ a_emb.float().T
    sims = sims.masked_fill(g[None, :] == g[:, None], float("-inf"))
    # one candidate per group: the first pair of each group stands for it
    first = torch.full((int(g.max()) + 1,), -1, dtype=torch.long)
    for i in range(len(g) - 1, -1, -1):
        first[g[i]] = i
    keep = torch.zeros(len(g), dtype=torch.bool)
    keep[first[first >= 0]] = True
    sims[:, ~keep] = float("-inf")
    k = min(k, int(keep.sum()) - 1)
    if k <= 0:
        return torch.zeros((len(g), 0), dtype=torch.long)
    return sims.topk(k, dim=1).indices


def contrastive_loss(q: torch.Tensor, a: torch.Tensor, scale: float, row_groups: torch.Tensor,
                     col_groups: torch.Tensor, symmetric: bool = False,
                     targets: torch.Tensor | None = None) -> torch.Tensor:
    """In-batch-negatives cross-entropy with group masking.

    Args:
        q: (n, d) normalised question embeddings; a: (m, d) normalised candidates whose first n
            rows are the positives (then hard negatives), or, with ``targets``, any candidates.
        scale: cosine -> logit multiplier (20 as in sentence-transformers).
        row_groups: (n,) answer group of each row; col_groups: (m,) of each candidate.
        symmetric: also the answer->question direction over the n positives (CLIP).
        targets: (n,) column of each row's positive (grouped batches: several rows share one
            answer column); ``None`` = the diagonal.
    """
    n = q.shape[0]
    rows = torch.arange(n, device=q.device)
    eye = rows if targets is None else targets.to(q.device)
    if symmetric and targets is not None:
        raise InputError("symmetric loss needs one positive column per row (batching 'unique' or 'random')")
    same = row_groups[:, None] == col_groups[None, :]
    same[rows, eye] = False
    logits = (q @ a.T).float() * scale
    logits = logits.masked_fill(same, float("-inf"))
    loss = F.cross_entropy(logits, eye)
    if symmetric:
        back = (a[:n] @ q.T).float() * scale
        back = back.masked_fill(same[:, :n].T, float("-inf"))
        loss = 0.5 * (loss + F.cross_entropy(back, eye))
    return loss


def lr_factor(step: int, total: int, schedule: str, warmup_ratio: float) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total``: linear warm-up
    over ``ceil(warmup_ratio·total)`` steps, then constant, linear or cosine decay to 0."""
    warm = math.ceil(warmup_ratio * total) if warmup_ratio > 0 else 0
    if step < warm:
        return (step + 1) / (warm + 1)
    if schedule == "constant":
        return 1.0
    frac = (step - warm) / max(1, total - warm)
    if schedule == "linear":
        return max(0.0, 1.0 - frac)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


class ContrastiveData:
    """The pairs of a contrastive run with their answer groups and, optionally, mined hard
    negatives; :meth:`loss` computes one step's loss from a batch of pair indices.

    Built BEFORE the adapters are injected (grouping and mining use the base encoder).
    """

    def __init__(self, view: Any, data: Sequence[tuple[str, str]], cfg: Any) -> None:
        self.view, self.data, self.cfg = view, list(data), cfg
        answers = [a for _, a in self.data]
        need_emb = cfg.batching in ("unique", "grouped") or cfg.hard_negatives > 0
        a_emb = None
        if need_emb:  # encode each distinct answer once
            uniq = {a: i for i, a in enumerate(dict.fromkeys(answers))}
            a_emb = view.encode(list(uniq))[torch.tensor([uniq[a] for a in answers])]
        self.groups = answer_groups(answers, a_emb, cfg.near_duplicate) if need_emb else list(range(len(answers)))
        if len(set(self.groups)) < 2:
            raise InputError(f"pairs: contrastive training needs at least 2 distinct answers (in-batch "
                             f"negatives), got {len(set(self.groups))} among {len(answers)} pairs")
        self.group_t = torch.tensor(self.groups)
        self.hard = None
        if cfg.hard_negatives > 0:
            q_emb = view.encode([q for q, _ in self.data])
            self.hard = mine_hard_negatives(q_emb, a_emb, self.groups, cfg.hard_negatives)

    def plan(self, generator: torch.Generator) -> list[list[int]]:
        return plan_batches(self.groups, self.cfg.batch_size, self.cfg.epochs, generator,
                            self.cfg.batching)

    def loss(self, idx: Sequence[int]) -> torch.Tensor:
        """One step's loss. Columns: the rows' answers (``"grouped"``: one per answer group, its
        first pair's answer, which all the group's rows share), then the rows' hard negatives."""
        view, cfg = self.view, self.cfg
        idx = list(idx)
        targets = None
        if cfg.batching == "grouped":
            first: dict[int, int] = {}
            for i in idx:
                first.setdefault(self.groups[i], i)
            cols = list(first.values())
            col_of = {g: j for j, g in enumerate(first)}
            targets = torch.tensor([col_of[self.groups[i]] for i in idx])
        else:
            cols = list(idx)
        if self.hard is not None and self.hard.shape[1]:
            cols += self.hard[idx].flatten().tolist()
        q = F.normalize(view.embed_texts([self.data[i][0] for i in idx]), dim=-1)
        a = F.normalize(view.embed_texts([self.data[i][1] for i in cols]), dim=-1)
        dev = q.device
        return contrastive_loss(q, a, cfg.scale, self.group_t[idx].to(dev), self.group_t[cols].to(dev),
                                cfg.symmetric, None if targets is None else targets.to(dev))
