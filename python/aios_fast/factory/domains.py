"""Domains of the QA log: density clustering of record embeddings, ids kept stable across nights,
and readable names.

Pipeline (:class:`DomainClusterer`):

1. **Reduce**: PCA of the L2-normalised embeddings to ``dims`` components (fitted on at most
   ``max_fit`` rows, randomized solver, Halko et al. 2011), then re-normalised. HDBSCAN's cost
   grows with the dimension of its distance computations and density estimates degrade in
   384-d ("curse of dimensionality"); 16-32 PCA components keep the topical structure of
   sentence embeddings (the same reason BERTopic reduces before HDBSCAN, Grootendorst 2022)
   at a fraction of the cost, and PCA is deterministic for a seed, unlike UMAP.
2. **Cluster**: scikit-learn's HDBSCAN (Campello, Moulavi & Sander 2013; McInnes et al. 2017)
   on at most ``max_fit`` rows. Outliers get -1 and are left out, never forced into a domain.
   Above ``max_fit`` rows the rest are assigned the way ``hdbscan.approximate_predict`` does:
   a row joins the cluster of its nearest fitted neighbour only if it lies within that
   neighbour's core distance (its ``min_samples``-th neighbour distance), i.e. where it would
   not lower the density level at which the neighbour joined; otherwise it is an outlier.
   This keeps 100k × 384 well under a minute on 2 cores (about 20 s, ``benchmarks/bench_factory.py``).
3. **Match**: each new cluster's centroid (mean of its members' full 384-d embeddings,
   normalised) is matched to the previous night's domain centroids by the Hungarian algorithm
   on cosine similarity (``scipy.optimize.linear_sum_assignment``); a pair is kept only at
   cosine >= ``match_threshold``. Matched clusters inherit the domain id and name; the others
   become new domains with fresh ids. Unmatched old domains stay known (dormant).
4. **Name**: new domains take the majority of their records' ``domain`` field when that is
   a real label (not the logger's default "general") held by >= 60 % of them; otherwise the
   top terms of a class-based TF-IDF over the clusters' texts (c-TF-IDF, BERTopic).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import InputError

__all__ = ["Domain", "DomainClusterer", "Clustering", "reduce_dimensions", "density_clusters",
           "match_centroids", "ctfidf_terms", "slugify", "UNLABELLED"]

UNLABELLED = frozenset({"", "general", "unknown", "none", "misc"})


@dataclass
class Domain:
    """One domain known to the factory (persisted between nights)."""

    id: int
    name: str
    centroid: list[float]
    n_records: int = 0
    terms: list[str] = field(default_factory=list)
    label_source: str = "terms"  # "field" (records' domain) or "terms" (c-TF-IDF)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Domain":
        return cls(id=int(d["id"]), name=str(d["name"]), centroid=[float(x) for x in d["centroid"]],
                   n_records=int(d.get("n_records", 0)), terms=list(d.get("terms", [])),
                   label_source=str(d.get("label_source", "terms")))


@dataclass
class Clustering:
    """Result of :meth:`DomainClusterer.assign`.

    ``domain_of`` holds one domain id per input row (-1 = outlier); ``domains`` is the full
    updated list (matched, new and dormant); ``matched`` maps new cluster label -> (domain id,
    cosine) for matched clusters; ``new_ids`` the ids created tonight.
    """

    domain_of: np.ndarray
    domains: list[Domain]
    n_clusters: int
    n_outliers: int
    matched: dict[int, tuple[int, float]]
    new_ids: list[int]
    seconds: dict[str, float]


def slugify(text: str, max_len: int = 40) -> str:
    """A skill-name-safe slug: lowercase ASCII letters, digits and underscores."""
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return (s[:max_len].rstrip("_")) or "domain"


def reduce_dimensions(X: np.ndarray, dims: int = 24, *, max_fit: int = 10000, seed: int = 0) -> np.ndarray:
    """PCA of ``X`` to ``dims`` components (fitted on at most ``max_fit`` rows), re-normalised to
    unit length so Euclidean distances stay monotone in cosine. Returns float32 (n, dims);
    ``X`` itself when it already has <= dims columns."""
    from sklearn.decomposition import PCA

    X = np.asarray(X, dtype=np.float32)
    n, d = X.shape
    k = min(dims, d, max(n - 1, 1))
    if k >= d:
        Z = X.copy()
    else:
        rng = np.random.default_rng(seed)
        fit = X if n <= max_fit else X[rng.choice(n, max_fit, replace=False)]
        pca = PCA(n_components=k, svd_solver="randomized", random_state=seed).fit(fit)
        Z = pca.transform(X).astype(np.float32)
    norms = np.linalg.norm(Z, axis=1, keepdims=True)
    return Z / np.maximum(norms, 1e-12)


def density_clusters(Z: np.ndarray, min_cluster_size: int, *, min_samples: int | None = None,
                     max_fit: int = 10000, seed: int = 0) -> np.ndarray:
    """HDBSCAN labels of the rows of ``Z`` (-1 = outlier), see the module docstring for the
    ``max_fit`` subsample and the core-distance assignment of the other rows."""
    from sklearn.cluster import HDBSCAN

    n = len(Z)
    ms = min_samples if min_samples is not None else min(min_cluster_size, 10)
    if n < max(min_cluster_size, 2):
        return np.full(n, -1, dtype=np.int64)
    rng = np.random.default_rng(seed)
    fit_idx = np.arange(n) if n <= max_fit else np.sort(rng.choice(n, max_fit, replace=False))
    F = Z[fit_idx]
    labels_fit = HDBSCAN(min_cluster_size=min_cluster_size, min_samples=ms, copy=True).fit(F).labels_
    if (labels_fit < 0).all():
        # no split found: by default HDBSCAN never returns the root as a cluster, so a log with a
        # single domain would yield nothing; ask again whether the rows form one cluster
        labels_fit = HDBSCAN(min_cluster_size=min_cluster_size, min_samples=ms, copy=True,
                             allow_single_cluster=True).fit(F).labels_
    if len(fit_idx) == n:
        return labels_fit.astype(np.int64)
    labels = np.full(n, -1, dtype=np.int64)
    labels[fit_idx] = labels_fit
    member = labels_fit >= 0
    if not member.any():
        return labels
    # core distance of each fitted row: its ms-th neighbour among the fitted rows (itself first)
    core_fit = _knn(F, F, ms)[0][:, -1]
    # a cluster exists down to the density level of its sparsest member: its birth distance
    birth = np.zeros(int(labels_fit.max()) + 1)
    np.maximum.at(birth, labels_fit[member], core_fit[member])
    rest = np.setdiff1d(np.arange(n), fit_idx, assume_unique=True)
    # nearest *clustered* fitted row; the row joins its cluster when the reachability
    # distance max(d, core(neighbour)) is within the cluster's birth distance, i.e. the row
    # lies inside the density level set at which HDBSCAN found the cluster
    dist_m, nbr_m = _knn(Z[rest], F[member], 1)
    lab = labels_fit[member][nbr_m[:, 0]]
    mreach = np.maximum(dist_m[:, 0], core_fit[member][nbr_m[:, 0]])
    ok = mreach <= birth[lab]
    labels[rest[ok]] = lab[ok]
    return labels


def _knn(Q: np.ndarray, F: np.ndarray, k: int, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of ``F`` for each row of ``Q``, both of unit length (what
    :func:`reduce_dimensions` returns): Euclidean distances and indices. For unit vectors
    ``‖q − f‖² = 2 − 2·q·f``, so one GEMM per chunk and a max (or top-k) over it find the
    neighbours with a single temporary - in 16-32 dimensions this beats tree searches, whose
    pruning fails at that dimension, and the full distance formula's extra passes."""
    import torch

    Ft = torch.from_numpy(np.ascontiguousarray(F, dtype=np.float32))
    dists, idx = [], []
    for i in range(0, len(Q), chunk):
        q = torch.from_numpy(np.ascontiguousarray(Q[i:i + chunk], dtype=np.float32))
        sims = q @ Ft.T
        if k == 1:  # max is several times cheaper than a top-k selection
            v, j = sims.max(1, keepdim=True)
        else:
            v, j = torch.topk(sims, k, dim=1, largest=True, sorted=True)
        dists.append(torch.sqrt(torch.clamp(2.0 - 2.0 * v, min=0.0)).numpy())
        idx.append(j.numpy())
    return np.concatenate(dists), np.concatenate(idx)


def match_centroids(new: np.ndarray, old: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """Hungarian matching of ``new`` (k, d) to ``old`` (m, d) unit centroids maximising total
    cosine; returns ``(new_row, old_row, cosine)`` for the pairs with cosine >= threshold."""
    from scipy.optimize import linear_sum_assignment

    if len(new) == 0 or len(old) == 0:
        return []
    sim = np.asarray(new, np.float64) @ np.asarray(old, np.float64).T
    rows, cols = linear_sum_assignment(-sim)
    return [(int(r), int(c), float(sim[r, c])) for r, c in zip(rows, cols) if sim[r, c] >= threshold]


def ctfidf_terms(docs_per_class: Sequence[Sequence[str]], top_n: int = 3) -> list[list[str]]:
    """Top ``top_n`` terms per class by class-based TF-IDF (BERTopic's c-TF-IDF,
    Grootendorst 2022): ``tf(t, c) · log(1 + A / f(t))`` with tf normalised per class, ``f(t)``
    the term's frequency over all classes and ``A`` the average number of words per class."""
    from sklearn.feature_extraction.text import CountVectorizer

    joined = [" ".join(d) for d in docs_per_class]
    if not any(s.strip() for s in joined):
        return [[] for _ in joined]
    try:
        cv = CountVectorizer(stop_words="english", token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]{2,}\b")
        counts = cv.fit_transform(joined).toarray().astype(np.float64)
    except ValueError:  # every word was a stop word
        return [[] for _ in joined]
    vocab = np.array(cv.get_feature_names_out())
    words_per_class = counts.sum(1, keepdims=True)
    tf = counts / np.maximum(words_per_class, 1.0)
    A = float(words_per_class.mean())
    idf = np.log1p(A / np.maximum(counts.sum(0), 1.0))
    score = tf * idf
    out = []
    for row in score:
        order = np.argsort(-row, kind="stable")
        out.append([str(vocab[i]) for i in order[:top_n] if row[i] > 0])
    return out


class DomainClusterer:
    """Clusters record embeddings into domains and keeps their ids stable (module docstring).

    Args:
        min_cluster_size: smallest domain; ``None`` = max(10, 0.5 % of the rows clustered).
        min_samples: HDBSCAN's density smoothing (default min(min_cluster_size, 10)).
        dims: PCA components before clustering.
        max_fit: rows HDBSCAN runs on; the rest are assigned by core distance.
        match_threshold: minimum cosine between a new cluster's centroid and an old domain's
            centroid to inherit its id.
        seed: subsampling and PCA seed (same seed, same input -> same result).
    """

    def __init__(self, min_cluster_size: int | None = None, *, min_samples: int | None = None, dims: int = 16,
                 max_fit: int = 10000, match_threshold: float = 0.75, seed: int = 0) -> None:
        if min_cluster_size is not None and (not isinstance(min_cluster_size, int) or min_cluster_size < 2):
            raise InputError(f"min_cluster_size: expected an int >= 2 or None, got {min_cluster_size!r}")
        if not isinstance(dims, int) or dims < 2:
            raise InputError(f"dims: expected an int >= 2, got {dims!r}")
        if not (isinstance(max_fit, int) and max_fit >= 100):
            raise InputError(f"max_fit: expected an int >= 100, got {max_fit!r}")
        if not (-1.0 <= float(match_threshold) <= 1.0):
            raise InputError(f"match_threshold: expected a cosine in [-1, 1], got {match_threshold!r}")
        self.min_cluster_size = min_cluster_size
        self.min_samples = min_samples
        self.dims = dims
        self.max_fit = max_fit
        self.match_threshold = float(match_threshold)
        self.seed = seed

    def labels(self, X: np.ndarray) -> np.ndarray:
        """Cluster labels (-1 = outlier) of the (n, d) embeddings ``X``: reduce, then HDBSCAN."""
        X = _check_matrix(X)
        mcs = self._mcs(len(X))
        if len(X) < mcs or float(X.var(0).sum()) < 1e-12:
            return np.full(len(X), -1, dtype=np.int64)  # too few rows, or all alike: no density structure
        # few rows cannot support a density estimate in many dimensions: about 25 rows per
        # dimension (5 at least), up to ``dims``
        dims = min(self.dims, max(5, len(X) // 25))
        Z = reduce_dimensions(X, dims, max_fit=self.max_fit, seed=self.seed)
        return density_clusters(Z, mcs, min_samples=self.min_samples, max_fit=self.max_fit, seed=self.seed)

    def _mcs(self, n: int) -> int:
        if self.min_cluster_size is not None:
            return self.min_cluster_size
        return max(10, int(round(0.005 * min(n, self.max_fit))))

    def assign(self, X: np.ndarray, texts: Sequence[str], field_labels: Sequence[str] | None = None,
               previous: Sequence[Domain] = ()) -> Clustering:
        """Cluster ``X`` (one row per record; ``texts`` the records' text for naming (c-TF-IDF),
        ``field_labels`` their ``domain`` field) and match the clusters to ``previous``."""
        import time

        X = _check_matrix(X)
        if len(texts) != len(X) or (field_labels is not None and len(field_labels) != len(X)):
            raise InputError(f"assign: {len(X)} embeddings but {len(texts)} texts"
                             f"{'' if field_labels is None else f' and {len(field_labels)} labels'}")
        prev = list(previous)
        dims = {len(d.centroid) for d in prev}
        if dims and dims != {X.shape[1]}:
            raise InputError(f"previous domains have {sorted(dims)}-d centroids but the embeddings are "
                             f"{X.shape[1]}-d; was the encoder changed? Start a new factory workspace")
        old = np.array([d.centroid for d in prev], dtype=np.float64) if prev else np.zeros((0, X.shape[1]))
        t0 = time.perf_counter()
        labels = self.labels(X)
        t1 = time.perf_counter()
        ks = sorted(int(k) for k in set(labels.tolist()) if k >= 0)
        cents = np.stack([_unit(X[labels == k].mean(0)) for k in ks]) if ks else np.zeros((0, X.shape[1]))
        pairs = match_centroids(cents, old, self.match_threshold)
        by_new = {ks[r]: (prev[c].id, cos) for r, c, cos in pairs}
        next_id = max([d.id for d in prev], default=-1) + 1
        domains = {d.id: Domain.from_dict(d.to_dict()) for d in prev}
        texts_of = {k: [texts[i] for i in np.flatnonzero(labels == k)] for k in ks}
        terms = dict(zip(ks, ctfidf_terms([texts_of[k] for k in ks]))) if ks else {}
        taken = {d.name for d in prev}
        cluster_to_domain: dict[int, int] = {}
        new_ids: list[int] = []
        for k in ks:
            members = np.flatnonzero(labels == k)
            if k in by_new:
                did = by_new[k][0]
                d = domains[did]
                d.centroid = cents[ks.index(k)].tolist()
                d.n_records = int(len(members))
                d.terms = terms.get(k, d.terms)
            else:
                did = next_id
                next_id += 1
                name, source = self._name(k, members, field_labels, terms.get(k, []), did)
                if name in taken:
                    name = f"{name}_{did}"
                taken.add(name)
                domains[did] = Domain(id=did, name=name, centroid=cents[ks.index(k)].tolist(),
                                      n_records=int(len(members)), terms=terms.get(k, []), label_source=source)
                new_ids.append(did)
            cluster_to_domain[k] = did
        domain_of = np.array([cluster_to_domain.get(int(k), -1) for k in labels], dtype=np.int64)
        return Clustering(domain_of=domain_of, domains=[domains[i] for i in sorted(domains)],
                          n_clusters=len(ks), n_outliers=int((labels < 0).sum()), matched=by_new,
                          new_ids=new_ids, seconds={"cluster": t1 - t0, "match_and_name": time.perf_counter() - t1})

    @staticmethod
    def _name(k: int, members: np.ndarray, field_labels, terms: list[str], did: int) -> tuple[str, str]:
        if field_labels is not None:
            votes = Counter(str(field_labels[i]).strip() for i in members)
            label, count = votes.most_common(1)[0]
            if label.lower() not in UNLABELLED and count >= math.ceil(0.6 * len(members)):
                return slugify(label), "field"
        if terms:
            return slugify("_".join(terms[:2])), "terms"
        return f"domain_{did}", "terms"


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _check_matrix(X: Any) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[1] < 2:
        raise InputError(f"embeddings: expected an (n, d) matrix with d >= 2, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise InputError("embeddings: contain NaN or inf")
    return X
