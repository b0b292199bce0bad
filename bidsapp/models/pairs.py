"""Lazy sampling of the six pair types of MRAI-NET (section 2.2 of the paper).

Similar (y=1): same tissue, source-source, source-target and target-target. Dissimilar (y=0): different
tissues, with the same three scanner combinations. With N source and M target patches there are O((N+M)^2)
pairs; the sampler never builds them: it draws a pair type, then tissue(s), then one index from each pool,
so memory stays O(N+M) and a few labelled target patches still yield many distinct pairs. Which types
are drawn, and how often, is the ``weights`` choice: by default the reference code's mix, which has no
target-target pairs (:data:`REFERENCE_WEIGHTS`).

Several target groups are allowed (the group level learns across all scanners of a dataset): "target" is
then any non-source group; each is pulled onto the source, and target-target pairs, when drawn, may join
two different target scanners.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PAIR_TYPES", "REFERENCE_WEIGHTS", "PairBatch", "PairSampler"]

# (role of a, role of b, similar)
PAIR_TYPES: tuple[tuple[str, str, bool], ...] = (
    ("source", "source", True),
    ("source", "target", True),
    ("target", "target", True),
    ("source", "source", False),
    ("source", "target", False),
    ("target", "target", False),
)


REFERENCE_WEIGHTS = (1, 1, 0, 2, 2, 0)
"""Pair-type weights of the reference code (github.com/wmkouw/mrai-net, ``acqinv_cnn.train``): for each
tissue k of a source patch, a similar pair with a target and with another source patch of tissue k, and a
dissimilar pair with a target and with a source patch of each other tissue (two of each with three
tissues). Measured on the paper's experiment (benchmarks/mrainet/run.py, 5 seeds, 100 target patches
per tissue): proxy A-distance 0.05 after training with this mix and Keras' RMSprop constant, against 0.39
with the six types equally likely and PyTorch's."""


@dataclass
class PairBatch:
    a: np.ndarray          # indices into the patch arrays
    b: np.ndarray
    y: np.ndarray          # 1 similar, 0 dissimilar (float32)
    pair_type: np.ndarray  # index into PAIR_TYPES


class PairSampler:
    """Draw pairs of labelled patches.

    tissues: (P,) int labels, negative for unlabelled patches (never paired).
    domains: (P,) int scanner/acquisition-group ids; ``source_domain`` is the labelled-rich one.
    weights: "reference" (the authors' reference code: per tissue, one similar source-source and one
    similar source-target pair for every two dissimilar of each, no target-target pairs), "balanced" (each
    feasible pair type equally often: keeps the few target patches from being drowned by source-source
    pairs), "combinatorial" (types in proportion to how many pairs of that type exist, i.e. uniform over
    the whole pair set) or a sequence of six non-negative weights (in :data:`PAIR_TYPES` order).
    """

    def __init__(self, tissues, domains, source_domain: int = 0, weights="reference", seed: int | None = None):
        self.tissues = np.asarray(tissues, dtype=np.int64)
        self.domains = np.asarray(domains, dtype=np.int64)
        if self.tissues.shape != self.domains.shape:
            raise ValueError("tissues and domains must have the same length")
        self.rng = np.random.default_rng(seed)
        labelled = self.tissues >= 0
        is_src = self.domains == source_domain
        self.classes = np.unique(self.tissues[labelled])
        self.pools = {
            role: {int(k): np.flatnonzero(labelled & sel & (self.tissues == k)) for k in self.classes}
            for role, sel in (("source", is_src), ("target", ~is_src))
        }
        self.counts = self.count_pairs()
        feasible = np.array([self.counts[i] > 0 for i in range(len(PAIR_TYPES))], dtype=float)
        if isinstance(weights, str):
            if weights == "reference":
                w = np.array(REFERENCE_WEIGHTS, dtype=float) * feasible
            elif weights == "balanced":
                w = feasible
            elif weights == "combinatorial":
                w = np.array([float(self.counts[i]) for i in range(len(PAIR_TYPES))])
            else:
                raise ValueError(f"unknown weights {weights!r}")
        else:
            w = np.asarray(weights, dtype=float) * feasible
            if w.shape != (len(PAIR_TYPES),) or (w < 0).any():
                raise ValueError("weights must be six non-negative numbers")
        if w.sum() == 0:
            raise ValueError("no pair type can be formed: need labelled patches of at least one tissue")
        self.type_probs = w / w.sum()

    def _sizes(self, role: str) -> np.ndarray:
        return np.array([len(self.pools[role][int(k)]) for k in self.classes], dtype=np.int64)

    def count_pairs(self) -> dict[int, int]:
        """Number of ordered pairs of each type. A patch is never paired with itself: the paper's count
        (N_k + M_k)^2 includes such pairs, but their distance is 0 and so is their loss (with one labelled
        target patch per tissue they would be a sixth of every batch and teach nothing)."""
        n, m = self._sizes("source"), self._sizes("target")
        out = {}
        for t, (ra, rb, sim) in enumerate(PAIR_TYPES):
            sa, sb = (n if ra == "source" else m), (n if rb == "source" else m)
            same = int((sa * sb).sum())
            if sim:
                out[t] = same - int(sa.sum()) if ra == rb else same
            else:
                out[t] = int(sa.sum() * sb.sum() - same)
        return out

    @property
    def total_pairs(self) -> int:
        return int(sum(self.counts.values()))

    def _tissue_probs(self, ra: str, rb: str, sim: bool) -> tuple[np.ndarray, np.ndarray]:
        """Tissues (or ordered tissue pairs) that can form this pair type, drawn uniformly."""
        a, b = self._sizes(ra) > 0, self._sizes(rb) > 0
        if sim:
            if ra == rb:                       # two different patches of one pool
                a = b = self._sizes(ra) > 1
            return np.flatnonzero(a & b), None
        ka, kb = np.nonzero(a[:, None] & b[None, :] & ~np.eye(len(a), dtype=bool))
        return ka, kb

    def sample(self, n: int) -> PairBatch:
        types = self.rng.choice(len(PAIR_TYPES), size=n, p=self.type_probs)
        a = np.empty(n, np.int64)
        b = np.empty(n, np.int64)
        for t in np.unique(types):
            ra, rb, sim = PAIR_TYPES[t]
            sel = np.flatnonzero(types == t)
            ka, kb = self._tissue_probs(ra, rb, sim)
            pick = self.rng.integers(len(ka), size=len(sel))
            tis_a = self.classes[ka[pick]]
            tis_b = tis_a if sim else self.classes[kb[pick]]
            a[sel] = self._draw(ra, tis_a)
            b[sel] = self._draw(rb, tis_b, not_=a[sel] if (sim and ra == rb) else None)
        y = np.array([PAIR_TYPES[t][2] for t in types], dtype=np.float32)
        return PairBatch(a=a, b=b, y=y, pair_type=types)

    def _draw(self, role: str, tissues: np.ndarray, not_: np.ndarray | None = None) -> np.ndarray:
        """One patch of each tissue from the role's pool; ``not_``: patches each draw must differ from."""
        out = np.empty(len(tissues), np.int64)
        for k in np.unique(tissues):
            sel = np.flatnonzero(tissues == k)
            pool = self.pools[role][int(k)]
            if not_ is None:
                out[sel] = pool[self.rng.integers(len(pool), size=len(sel))]
            else:   # uniform over the pool without the excluded patch: skip over its position
                j = self.rng.integers(len(pool) - 1, size=len(sel))
                j += j >= np.searchsorted(pool, not_[sel])
                out[sel] = pool[j]
        return out
