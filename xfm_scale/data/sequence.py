"""Closed-form sample sequences: which corpus fills each position of the blend, and each epoch's
order of a corpus's samples, computed per position, with nothing stored per sample.

Split tree (the mixture)
    The corpora are the leaves of a binary tree; every internal node splits the samples that reach
    it between its two children in the ratio of their weights, ``r = W_small / W_node <= 1/2``:
    of the first ``m`` samples of a node, ``s(m) = floor(r*m + 1/2)`` go to the lighter child and
    ``m - s(m)`` to the heavier one, and sample ``m`` itself goes to the lighter child exactly when
    ``s(m+1) > s(m)``. So the count of every node at any prefix ``n`` of the global sequence is a
    chain of ``floor`` evaluations from the root (``O(depth)``), sample ``i``'s corpus and its draw
    number within the corpus (the corpus's count before ``i``) is a walk down the tree, and the
    position of a node's k-th sample is a walk up it (inverting each ``s``). No state carries from
    one sample to the next: any window of the sequence, at ``i = 0`` or ``i = 10^10``, costs the
    same, and a longer sequence extends a shorter one (prefix stability).

    Share guarantee: the rounding error of a split, ``e_B = m_B - r_B m_parent``, lies in
    ``[-1/2, 1/2]``; the deviation of leaf ``c`` from its ideal ``w_c n`` telescopes to
    ``sum over the nodes B on its path (root excluded) of (w_c / W_B) e_B``, so it is at most
    ``bound_c = 1/2 * sum_B w_c / W_B`` at EVERY prefix. :func:`choose_tree` picks, among the trees
    whose groups (modalities) are subtrees, one that minimises the largest bound (all trees for
    <= 6 leaves per group, else a Huffman tree and a few others). For a Huffman tree the node
    weights on a path grow at least like the Fibonacci numbers, so the bound of one modality's
    corpora is below ``1/2 * sum 1/F_k = 1.68`` for any weights; with up to three modality
    subtrees the worst of 4000 random specs (1 to 13 corpora, weights down to 1e-9) was 1.49. So the
    counts stay inside megatron's "within one sample of ``floor``/``ceil`` of ``w_c n``"
    (|deviation| < 2), and below 1 (every count is ``floor`` or ``ceil`` of ``w_c n``) for typical
    specs.

    Numerics: ``s`` is evaluated in IEEE float64 (``m`` exact below 2**53; every process computes
    the same bits), and only for the lighter child (``r <= 1/2``), so ``s(m+1) - s(m)`` is 0 or 1
    even with rounding: the sequence is always a valid interleaving. Positions below 2**48.
    Walking up inverts ``s``: in real numbers the parent index of a child's k-th sample is
    ``ceil((k + 1/2) / rate) - 1`` for the lighter child and ``floor`` of the quotient for the
    heavier one; the float guess is exact whenever ``(k + 1/2) / rate`` lies farther than 2**-48
    of its size from an integer (16x the float error of the guess and of ``s``), or always for a
    dyadic split (exact float counts), and the others are solved against ``s`` itself (two
    candidates, each verified). A run of positions is served by walking up
    from each corpus's consecutive draws (its counts at both ends are closed forms); timings
    against megatron's helper: benchmarks/RESULTS.md, ``benchmarks/data.py blend``.

Keyed epoch permutation (the order within an epoch)
    Epoch ``e`` of a corpus of ``n`` samples reads its samples in the order of a keyed bijection of
    ``[0, n)``: a 4-round alternating Feistel network on ``ceil(log2 n)`` bits with cycle walking
    (values >= n are encrypted again until they fall in range; at most 2x the work on average),
    keyed by (seed, corpus name) and by the epoch. Vectorised in numpy, 32-bit arithmetic for
    corpora below 2**32 samples; a small corpus read many times in a block is computed as whole
    epochs in rows, each row's keys broadcast along it.
"""
from __future__ import annotations

import heapq
import itertools
import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

MAX_POSITIONS = 1 << 48
"""Sequences are defined for positions below this (float64 keeps every split exact there)."""
DYADIC = 16.0
"""Splits whose ratio is a multiple of 1/DYADIC have exact float counts (positions below 2**48)."""
EXHAUSTIVE_LEAVES = 6
"""Groups of at most this many leaves try every tree shape (945 for 6)."""

# ---------------------------------------------------------------------------------------------
# choosing the tree


def _weight(tree, w) -> float:
    return w[tree] if isinstance(tree, int) else _weight(tree[0], w) + _weight(tree[1], w)


def _path_sums(tree, w) -> dict[int, float]:
    """Per leaf: sum over the nodes on its path up to and including ``tree`` of 1 / W_node."""
    if isinstance(tree, int):
        return {tree: 1.0 / w[tree]}
    top = 1.0 / _weight(tree, w)
    out = {}
    for child in tree:
        out.update({leaf: s + top for leaf, s in _path_sums(child, w).items()})
    return out


def _all_trees(leaves: tuple[int, ...]):
    """Every unordered binary tree over these leaves ((2k-3)!! of them)."""
    if len(leaves) == 1:
        yield leaves[0]
        return
    first, rest = leaves[0], leaves[1:]
    for size in range(0, len(rest)):
        for others in itertools.combinations(rest, size):
            left = (first, *others)
            right = tuple(x for x in rest if x not in others)
            for a in _all_trees(left):
                for b in _all_trees(right):
                    yield (a, b)


def _huffman(leaves, w):
    heap = [(w[c], i, c) for i, c in enumerate(leaves)]
    heapq.heapify(heap)
    counter = len(heap)
    while len(heap) > 1:
        wa, _, a = heapq.heappop(heap)
        wb, _, b = heapq.heappop(heap)
        heapq.heappush(heap, (wa + wb, counter, (a, b)))
        counter += 1
    return heap[0][2]


def _balanced(leaves, w):
    """Top down: split the leaves into two sets of near-equal weight (heaviest first)."""
    if len(leaves) == 1:
        return leaves[0]
    order = sorted(leaves, key=lambda c: (-w[c], c))
    sides: tuple[list, list] = ([], [])
    totals = [0.0, 0.0]
    for c in order:
        side = 0 if totals[0] <= totals[1] else 1
        sides[side].append(c)
        totals[side] += w[c]
    return (_balanced(tuple(sides[0]), w), _balanced(tuple(sides[1]), w))


def _chain(leaves):
    tree = leaves[-1]
    for c in reversed(leaves[:-1]):
        tree = (c, tree)
    return tree


def _candidates(leaves: tuple[int, ...], w):
    if len(leaves) <= EXHAUSTIVE_LEAVES:
        yield from _all_trees(leaves)
        return
    by_weight = tuple(sorted(leaves, key=lambda c: (w[c], c)))
    yield _huffman(leaves, w)
    yield _balanced(leaves, w)
    yield _chain(by_weight)
    yield _chain(by_weight[::-1])
    yield (by_weight[0], _huffman(by_weight[1:], w))  # the lightest alone at the top


def _leaf_bounds(tree, w, above: float) -> dict[int, float]:
    """Per leaf of ``tree``: 1/2 * w_c * (above + path sum), ``above`` being the sum of 1/W over
    the ancestors of ``tree`` (root excluded; -1/W_root when ``tree`` is the root itself)."""
    return {c: 0.5 * w[c] * (above + s) for c, s in _path_sums(tree, w).items()}


def _best(cands, w, above):
    best, best_key = None, None
    for tree in cands:
        bounds = _leaf_bounds(tree, w, above)
        key = (round(max(bounds.values()), 12), round(sum(b * w[c] for c, b in bounds.items()), 12))
        if best_key is None or key < best_key:
            best, best_key = tree, key
    return best, best_key


def choose_tree(weights: Sequence[float], groups: Sequence[int] | None = None):
    """The split tree over leaves ``0..len(weights)-1`` (all weights > 0) whose every group is a
    subtree, with the smallest largest share-deviation bound (see the module docstring).
    Deterministic: a function of the weights and groups only."""
    w = [float(x) for x in weights]
    if not w or min(w) <= 0:
        raise ValueError(f"weights must be positive: {weights}")
    groups = list(groups) if groups is not None else [0] * len(w)
    labels = list(dict.fromkeys(groups))
    members = {g: tuple(c for c in range(len(w)) if groups[c] == g) for g in labels}
    gw = {g: sum(w[c] for c in members[g]) for g in labels}
    gleaf = {g: i for i, g in enumerate(labels)}  # groups as leaves of the top-level tree
    gw_list = [gw[g] for g in labels]
    best_tree, best_key = None, None
    for top in _all_trees(tuple(range(len(labels)))) if len(labels) <= EXHAUSTIVE_LEAVES else [
            _huffman(tuple(range(len(labels))), gw_list)]:
        sums = _path_sums(top, gw_list)
        total = sum(gw_list)
        subtrees, keys = {}, []
        for g in labels:
            # sum of 1/W over the nodes strictly above the group's subtree, the root excluded
            # (-1/W_root when the group is the whole tree: its own top term is then not counted)
            above = sums[gleaf[g]] - 1.0 / gw[g] - 1.0 / total
            subtrees[g], key = _best(_candidates(members[g], w), w, above)
            keys.append(key)
        key = (max(k[0] for k in keys), round(sum(k[1] for k in keys), 12))
        if best_key is None or key < best_key:
            best_key = key
            best_tree = _substitute(top, {gleaf[g]: subtrees[g] for g in labels})
    return best_tree


def _substitute(tree, leaves):
    if isinstance(tree, int):
        return leaves[tree]
    return (_substitute(tree[0], leaves), _substitute(tree[1], leaves))


# ---------------------------------------------------------------------------------------------
# the split tree as arrays


def _small_count(ratio: float, m: np.ndarray) -> np.ndarray:
    """Of a node's first ``m`` samples, how many go to its lighter child: floor(r*m + 1/2)."""
    return np.floor(np.multiply(m, ratio, dtype=np.float64) + 0.5).astype(np.int64)


def _child_count(ratio: float, small: bool, m: np.ndarray) -> np.ndarray:
    """Of a node's first ``m`` samples (float64 array of exact integers), how many go to its lighter
    (``small``) or heavier child, as float64: the same float operations as :func:`_small_count`."""
    s = np.multiply(m, ratio)
    s += 0.5
    np.floor(s, out=s)
    return s if small else np.subtract(m, s, out=s)


def _small_count_one(ratio: float, m: int) -> int:
    """:func:`_small_count` of one count, in Python floats: the same IEEE float64 operations."""
    return math.floor(m * ratio + 0.5)


@dataclass(frozen=True)
class _Node:
    weight: float
    small: int  # child node ids (-1 for a leaf)
    large: int
    ratio: float  # W_small / W_node (0 for a leaf)


class SplitTree:
    """A weighted mixture of ``len(weights)`` leaves (every weight > 0) in closed form.

    Node ids: leaves are ``0..L-1``, internal nodes follow, the root is last. ``groups`` (one label
    per leaf) makes each group a subtree, so a group's count and its k-th sample are closed forms too.
    """

    def __init__(self, weights: Sequence[float], groups: Sequence[int] | None = None):
        self.num_leaves = len(weights)
        total = float(sum(weights))
        w = [float(x) / total for x in weights]
        self.weights = w
        shape = choose_tree(w, groups)
        self.shape = shape
        nodes: list[_Node] = [_Node(x, -1, -1, 0.0) for x in w]
        parent = [-1] * len(w)
        is_small = [False] * len(w)

        def build(tree) -> int:
            if isinstance(tree, int):
                return tree
            a, b = build(tree[0]), build(tree[1])
            if (nodes[a].weight, a) > (nodes[b].weight, b):
                a, b = b, a  # a is the lighter child (ties: the smaller id)
            total = nodes[a].weight + nodes[b].weight
            nodes.append(_Node(total, a, b, nodes[a].weight / total))
            parent.append(-1)
            is_small.append(False)
            v = len(nodes) - 1
            parent[a], parent[b], is_small[a], is_small[b] = v, v, True, False
            return v

        self.root = build(shape)
        self.nodes, self.parent, self.is_small = nodes, parent, is_small
        self.depth = [self._depth(v) for v in range(len(nodes))]
        groups = list(groups) if groups is not None else [0] * len(w)
        self.group_node = {}
        for g in dict.fromkeys(groups):
            leaves = [c for c in range(len(w)) if groups[c] == g]
            self.group_node[g] = self._common_ancestor(leaves)
        self.bounds = self._bounds()

    def _depth(self, v: int) -> int:
        d = 0
        while self.parent[v] >= 0:
            v, d = self.parent[v], d + 1
        return d

    def _ancestors(self, v: int) -> list[int]:
        out = [v]
        while self.parent[v] >= 0:
            v = self.parent[v]
            out.append(v)
        return out

    def _common_ancestor(self, leaves: list[int]) -> int:
        paths = [self._ancestors(c) for c in leaves]
        common = set(paths[0]).intersection(*map(set, paths[1:]))
        return min(common, key=lambda v: self.depth[v] * -1)

    def _bounds(self) -> list[float]:
        """Per leaf: the largest |count - w n| at any prefix (see the module docstring)."""
        out = []
        for c in range(self.num_leaves):
            path = self._ancestors(c)[:-1]  # the root's count is n exactly: no error
            out.append(0.5 * sum(self.weights[c] / self.nodes[v].weight for v in path))
        return out

    # ----------------------------------------------------------------- counts
    def counts(self, n: int) -> list[int]:
        """Per node: its count among the first ``n`` positions (node ids; leaves first)."""
        out = [0] * len(self.nodes)
        out[self.root] = int(n)
        for v in range(len(self.nodes) - 1, self.num_leaves - 1, -1):  # parents after children
            node = self.nodes[v]
            s = _small_count_one(node.ratio, out[v])
            out[node.small], out[node.large] = s, out[v] - s
        return out

    def leaf_counts(self, n: int) -> np.ndarray:
        return np.array(self.counts(n)[:self.num_leaves], dtype=np.int64)

    # ----------------------------------------------------------------- walking down
    def descend_one(self, k: int, node: int | None = None) -> tuple[int, int]:
        """:meth:`descend` of one index, in Python arithmetic."""
        v = self.root if node is None else node
        while v >= self.num_leaves:
            n = self.nodes[v]
            s = _small_count_one(n.ratio, k)
            if _small_count_one(n.ratio, k + 1) > s:
                v, k = n.small, s
            else:
                v, k = n.large, k - s
        return v, k

    def descend(self, k: np.ndarray, node: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(leaf, index within the leaf) of the k-th samples of ``node`` (default: the root, where
        the k-th sample is position k). The index is the leaf's count before that sample."""
        k = np.asarray(k, dtype=np.int64).reshape(-1)
        leaf = np.empty(len(k), dtype=np.int16)
        index = np.empty(len(k), dtype=np.int64)
        self._descend(self.root if node is None else node, None, k, leaf, index)
        return leaf, index

    def _descend(self, v, slots, k, leaf, index) -> None:
        if v < self.num_leaves:
            if slots is None:
                leaf[:] = v
                index[:] = k
            else:
                leaf[slots] = v
                index[slots] = k
            return
        node = self.nodes[v]
        s0 = _small_count(node.ratio, k)
        to_small = _small_count(node.ratio, k + 1) > s0
        slots = np.arange(len(k)) if slots is None else slots
        if to_small.any():
            self._descend(node.small, slots[to_small], s0[to_small], leaf, index)
        if not to_small.all():
            large = ~to_small
            self._descend(node.large, slots[large], k[large] - s0[large], leaf, index)

    def fill(self, start: int, stop: int, node: int | None = None) -> list[tuple[int, int, np.ndarray]]:
        """The node's samples ``start..stop-1`` (consecutive) split by leaf: per leaf that gets any,
        (leaf, its index of the first, offsets of its samples within ``start..stop-1``, int64)."""
        out: list[tuple[int, int, np.ndarray]] = []
        size = int(stop - start)
        if size > 0:
            scratch = np.empty(size + 1, dtype=np.float64)
            self._fill(self.root if node is None else node, int(start), None, size, scratch, out)
        return out

    def _fill(self, v: int, first: int, offsets: np.ndarray | None, size: int, scratch: np.ndarray,
              out: list) -> None:
        if size == 0:
            return
        if v < self.num_leaves:
            out.append((v, first, np.arange(size, dtype=np.int64) if offsets is None else offsets))
            return
        node = self.nodes[v]
        s = scratch[:size + 1]
        np.add(self._ramp(size + 1), first, out=s)  # first, first+1, ...: exact below 2**53
        s *= node.ratio
        s += 0.5
        np.floor(s, out=s)
        to_small = s[1:] != s[:-1]
        small_first = int(s[0])
        small = np.flatnonzero(to_small) if offsets is None else offsets[to_small]
        np.logical_not(to_small, out=to_small)
        large = np.flatnonzero(to_small) if offsets is None else offsets[to_small]
        self._fill(node.small, small_first, small, len(small), scratch, out)
        self._fill(node.large, first - small_first, large, len(large), scratch, out)

    def _ramp(self, size: int) -> np.ndarray:
        if getattr(self, "_ramp_cache", None) is None or len(self._ramp_cache) < size:
            self._ramp_cache = np.arange(max(size, 1 << 16) + 1, dtype=np.float64)
        return self._ramp_cache[:size]

    # ----------------------------------------------------------------- walking up
    def position(self, node: int, k) -> np.ndarray:
        """Position in the root sequence of the k-th sample(s) of ``node`` (int64)."""
        k = np.asarray(k, dtype=np.int64).reshape(-1)
        if node == self.root:
            return k.copy()
        x = k.astype(np.float64)  # exact: indices below 2**48
        v = node
        while v != self.root:
            p = self.parent[v]
            x = self._index_in_parent_fast(self.nodes[p].ratio, self.is_small[v], x)
            v = p
        return x.astype(np.int64)

    def position_range(self, node: int, start: int, stop: int, out: np.ndarray | None = None,
                       shift: int = 0) -> np.ndarray:
        """:meth:`position` of the node's samples ``start..stop-1``, minus ``shift``, written into
        ``out`` (int64) when given."""
        out = np.empty(stop - start, dtype=np.int64) if out is None else out
        if node == self.root:
            out[:] = np.arange(start - shift, stop - shift, dtype=np.int64)
            return out
        x = np.arange(start, stop, dtype=np.float64)
        v = node
        while v != self.root:
            p = self.parent[v]
            x = self._index_in_parent_fast(self.nodes[p].ratio, self.is_small[v], x, ascending=True)
            v = p
        if shift:
            x -= shift  # exact: both are integers below 2**53
        out[:] = x
        return out

    @classmethod
    def _index_in_parent_fast(cls, ratio: float, small: bool, k: np.ndarray, ascending: bool = False) -> np.ndarray:
        """:meth:`_index_in_parent` of float64 indices (exact integers), as float64; ``ascending``:
        ``k`` is sorted (then so is the answer, and its last element is the largest).

        In real numbers the answer is ``ceil((k + 1/2) / rate) - 1`` for the lighter child (its
        count is ``floor(rate*m + 1/2)``) and ``floor((k + 1/2) / rate)`` for the heavier one (its
        count is ``m`` minus that, ``ceil(rate*m - 1/2)``): the same unless the quotient is an integer.

        * A dyadic split (``ratio`` a multiple of 1/16: 1/2, 1/4, 3/4 ...; equal weights give 1/2)
          has exact float counts, and the quotient ``(16k + 8) / c`` (``c`` < 16), computed by a
          correctly rounded division, is exact when it is an integer, and otherwise at least 1/15
          from one, farther than its rounding error (at most 2**-5 below 2**48): the formula is
          the answer.
        * Otherwise the float guess equals the answer, and the float-evaluated counts agree,
          whenever the quotient lies farther than ``tol`` from an integer, ``tol`` being 2**-48 of
          its size (16 times the float error of the guess and of the counts; see the module
          docstring). The quotients within ``tol`` (a few per window at 10^10; all of them at a
          rate of 1/q, q even) are solved by :meth:`_index_in_parent_near`."""
        if len(k) == 0:
            return k
        rate = ratio if small else 1.0 - ratio
        x = k + 0.5
        if (ratio * DYADIC).is_integer():
            x /= rate
            if not small:  # the heavier child's count is ceil(rate*m - 1/2): it steps at floor(quotient)
                return np.floor(x, out=x)
            guess = np.ceil(x, out=x)
            guess -= 1.0
            return guess
        x *= 1.0 / rate
        top = float(x[-1]) if ascending else float(x.max())
        tol = top * 2.0 ** -48 + 2.0 ** -40
        guess = np.floor(x)
        frac = np.subtract(x, guess)  # exactly, in [0, 1)
        if float(frac.min()) < tol or float(frac.max()) > 1.0 - tol:  # rare per element, common per window
            near = np.flatnonzero((frac < tol) | (frac > 1.0 - tol))
            if len(near) == len(k):
                return cls._index_in_parent_near(ratio, small, k, x)
            guess[near] = cls._index_in_parent_near(ratio, small, k[near], x[near])
        return guess

    @classmethod
    def _index_in_parent_near(cls, ratio: float, small: bool, k: np.ndarray, x: np.ndarray) -> np.ndarray:
        """:meth:`_index_in_parent` of float64 indices ``k`` whose float quotients ``x`` lie near an
        integer ``q``: the answer is ``q - 1`` when the child's count at ``q`` already exceeds ``k``,
        else ``q``; each is verified against the float counts (one more count each), and the rare
        one that fails (a far position with a tiny rate, where float counts lag several samples) is
        solved by stepping."""
        q = np.rint(x)
        at_q = _child_count(ratio, small, q)
        before = at_q > k  # the k-th sample is before parent index q
        answer = q - before
        other = _child_count(ratio, small, answer + ~before)  # at q - 1 when before, else at q + 1
        ok = np.where(before, other == k, (at_q == k) & (other > k))
        if not ok.all():
            bad = np.flatnonzero(~ok)
            answer[bad] = cls._index_in_parent(ratio, small, k[bad])
        return answer

    @staticmethod
    def _index_in_parent(ratio: float, small: bool, k: np.ndarray) -> np.ndarray:
        """The m with child_count(m) == k and child_count(m + 1) == k + 1 (the parent's sample
        that is the child's k-th), as int64 (``k``: integers, any dtype): a float guess, then corrected
        by unit steps against the float-evaluated counts."""
        rate = ratio if small else 1.0 - ratio
        k = np.asarray(k, dtype=np.float64)  # exact: indices below 2**48
        m = np.maximum(np.ceil((k + 0.5) / rate) - 1.0, k)
        for _ in range(64):
            low = _child_count(ratio, small, m) > k
            high = _child_count(ratio, small, m + 1.0) <= k
            if not (low.any() or high.any()):
                return m.astype(np.int64)
            m = m - low + high
        raise AssertionError("split tree inverse did not converge")  # unit steps: cannot happen


# ---------------------------------------------------------------------------------------------
# keyed epoch permutation

_ROUNDS = 4
PASS_CHUNK = 1 << 16
"""Values encrypted per numpy pass (its temporaries stay in the CPU cache)."""
IN_CACHE_RETRIES = 2
"""Cycle-walking passes per chunk while it is in cache; the few values still out of range after
them are walked together at the end (measured: fewer numpy calls than walking each chunk dry)."""
_GOLDEN64 = 0x9E3779B97F4A7C15
_PERMUTATION_STREAM = 0xF215_7E1  # keeps these keys apart from every other use of the seed
_ROUND_STEP = 0xD1B54A32D192ED03
_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    """The splitmix64 finaliser of a 64-bit integer."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
    return z ^ (z >> 31)


def _splitmix64_array(z: np.ndarray) -> np.ndarray:
    """:func:`_splitmix64` of a uint64 array (in place)."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


class EpochOrder:
    """Sample order of every epoch of a corpus of ``n`` samples: draw ``j`` (the corpus's j-th
    draw in the blend) reads sample ``perm_e(j % n)`` of epoch ``e = j // n``, where ``perm_e`` is
    a keyed Feistel bijection of ``[0, n)``, keyed by (seed, corpus name, e). Nothing is stored."""

    def __init__(self, seed: int, name: str, n: int):
        if n <= 0:
            raise ValueError(f"corpus {name!r} has no samples")
        self.n = int(n)
        self.bits = max(2, (self.n - 1).bit_length())
        self.wide = self.bits > 32
        self.dtype = np.uint64 if self.wide else np.uint32
        self.word = 64 if self.wide else 32
        state = np.random.SeedSequence([int(seed) & (2**63 - 1), zlib.crc32(name.encode()), _PERMUTATION_STREAM])
        self.key = int(state.generate_state(1, dtype=np.uint64)[0])
        # 4 rounds mix large domains well; a few bits per half have few round functions, so small
        # corpora take more rounds (measured spread of the orders of 3..5 samples, tests/data)
        self.rounds = _ROUNDS if self.bits > 16 else 2 * _ROUNDS if self.bits > 6 else 4 * _ROUNDS
        left = self.bits - self.bits // 2
        self.splits = [(left, self.bits - left) if r % 2 == 0 else (self.bits - left, left) for r in range(self.rounds)]

    # Round r of epoch e uses a key and an odd multiplier drawn from splitmix64(corpus key, e, r):
    # both vary with the epoch, so that even a 2-sample half sees an unbiased round function.
    def _round_keys(self, epoch: int) -> list[tuple]:
        """[(key, multiplier)] per round for one epoch, in Python integers (the same bits as
        :meth:`_round_keys_array`)."""
        out = []
        for r in range(self.rounds):
            z = _splitmix64((self.key + int(epoch) * _GOLDEN64 + r * _ROUND_STEP) & _MASK64)
            if self.wide:
                out.append((self.dtype(z), self.dtype(_splitmix64(z) | 1)))
            else:
                out.append((self.dtype(z & 0xFFFFFFFF), self.dtype((z >> 32) | 1)))
        return out

    def _round_keys_array(self, epoch: np.ndarray) -> list[tuple]:
        """:meth:`_round_keys` of one epoch per element."""
        e = epoch.astype(np.uint64) * np.uint64(_GOLDEN64) + np.uint64(self.key)
        out = []
        for r in range(self.rounds):
            z = _splitmix64_array(e + np.uint64(r * _ROUND_STEP & _MASK64))
            if self.wide:
                out.append((z, _splitmix64_array(z.copy()) | np.uint64(1)))
            else:
                out.append(((z & np.uint64(0xFFFFFFFF)).astype(np.uint32), ((z >> np.uint64(32)) | np.uint64(1)).astype(np.uint32)))
        return out

    def _encrypt(self, x: np.ndarray, keys: list[tuple], out: np.ndarray | None = None) -> np.ndarray:
        """One pass of the network over ``[0, 2**bits)``: round r maps (left, right) to
        (right, left ^ F_r(right)), F_r(right) = the top bits of ((right ^ key_r) * mult_r)
        (multiply-shift hashing); the halves swap sizes each round when ``bits`` is odd.
        ``out`` (may be ``x`` itself) receives the result."""
        t = self.dtype
        lbits, rbits = self.splits[0]
        left, right = x >> t(rbits), x & t((1 << rbits) - 1)
        h = np.empty_like(left)
        for r, (key, mult) in enumerate(keys):
            lbits, rbits = self.splits[r]
            np.bitwise_xor(right, key, out=h)
            h *= mult
            h >>= t(self.word - lbits)
            left ^= h
            left, right = right, left
        left <<= t(lbits)  # after the last swap: `left` holds the last round's right half
        return np.bitwise_or(left, right, out=left if out is None else out)

    def permute(self, offsets: np.ndarray, epoch: int | np.ndarray, owned: bool = False) -> np.ndarray:
        """``perm_epoch(offsets)`` as ``uint32``/``uint64`` (offsets in ``[0, n)``; epoch a scalar
        or one per offset), in cache-sized chunks. Cycle walking: the values that fall outside
        ``[0, n)`` are encrypted again, :data:`IN_CACHE_RETRIES` times while their chunk is in
        cache, then the few left all together until none is left.
        ``owned``: ``offsets`` is a scratch array of the word's dtype, overwritten with the result."""
        x = offsets if owned and offsets.dtype == self.dtype else np.array(offsets, dtype=self.dtype)
        if self.n == 1:
            return np.zeros(len(x), dtype=self.dtype)
        scalar = np.ndim(epoch) == 0
        keys = self._round_keys(epoch) if scalar else self._round_keys_array(np.asarray(epoch, dtype=np.int64))

        def part(index, of=keys):
            return of if scalar else [(k[index], m[index]) for k, m in of]

        left_over = []
        for a in range(0, len(x), PASS_CHUNK):
            chunk_keys = part(slice(a, a + PASS_CHUNK))
            y = x[a:a + PASS_CHUNK]
            self._encrypt(y, chunk_keys, out=y)
            # a few walking passes while the chunk is in cache; what is left joins one list for the end
            again = self._walk(y, np.flatnonzero(y >= self.n), lambda at: part(at, chunk_keys), IN_CACHE_RETRIES)
            if len(again):
                left_over.append(again + a)
        if left_over:
            self._walk(x, np.concatenate(left_over), part)
        return x

    def _walk(self, x: np.ndarray, at: np.ndarray, keys_at, passes: int | None = None) -> np.ndarray:
        """Cycle walking: encrypts ``x[at]`` again (round keys ``keys_at(at)``), in place, until
        every value is in ``[0, n)``, or for at most ``passes`` passes; returns the indices still
        out of range."""
        for _ in itertools.count() if passes is None else range(passes):
            if not len(at):
                break
            values = self._encrypt(x[at], keys_at(at))
            x[at] = values
            at = at[np.flatnonzero(values >= self.n)]
        return at

    def __call__(self, draws: np.ndarray) -> np.ndarray:
        """Sample index (int64) read by each draw number."""
        draws = np.asarray(draws, dtype=np.int64).reshape(-1)
        if len(draws) == 0:
            return np.zeros(0, dtype=np.int64)
        first, last = int(draws.min()) // self.n, int(draws.max()) // self.n
        if first == last:
            return self.permute(draws - first * self.n, first).astype(np.int64)
        epoch, offset = np.divmod(draws, self.n)
        return self.permute(offset, epoch).astype(np.int64)

    def _whole_epochs(self, first: int, last: int) -> np.ndarray:
        """Sample indices of every draw of epochs ``first..last``, in draw order: the epochs are the
        rows of a grid, a few rows per cache-sized pass, each row's round keys broadcast along it
        (no key per draw: 10x faster than :meth:`permute` with an epoch per draw for a corpus of
        10,000 samples read 20 times in a block)."""
        n, t = self.n, self.dtype
        out = np.empty((last - first + 1, n), dtype=t)
        out[:] = np.arange(n, dtype=t)
        if n == 1:
            out[:] = 0
            return out.reshape(-1)
        rows_per_pass = max(1, PASS_CHUNK // n)
        for a in range(0, len(out), rows_per_pass):
            rows = out[a:a + rows_per_pass]
            keys = self._round_keys_array(np.arange(first + a, first + a + len(rows), dtype=np.int64))
            broadcast = [(k[:, None], m[:, None]) for k, m in keys]
            self._encrypt(rows, broadcast, out=rows)
            for _ in range(IN_CACHE_RETRIES):  # cycle walking: whole rows again while many are out
                out_of_range = rows >= n
                if np.count_nonzero(out_of_range) * 8 < out_of_range.size:
                    break
                np.copyto(rows, self._encrypt(rows, broadcast), where=out_of_range)
            flat = rows.reshape(-1)  # a view: the rows are contiguous

            def row_keys(at: np.ndarray, keys=keys) -> list[tuple]:  # each value's own epoch's keys
                row = at // n
                return [(k[row], m[row]) for k, m in keys]

            self._walk(flat, np.flatnonzero(flat >= n), row_keys)  # the last few
        return out.reshape(-1)

    def range(self, start: int, stop: int) -> np.ndarray:
        """Sample index (``uint32``/``uint64``) of draws ``start..stop-1``, without a division or a
        key per draw: epoch by epoch, or for a small corpus read many times in the range, its
        whole epochs as rows (:meth:`_whole_epochs`)."""
        if stop - start > 4 * self.n and self.n <= PASS_CHUNK:  # a small corpus read many times: whole epochs as rows
            first = start // self.n
            return self._whole_epochs(first, (stop - 1) // self.n)[start - first * self.n:stop - first * self.n]
        e = start // self.n
        if (stop - 1) // self.n == e:  # one epoch: the common case of a large corpus
            return self.permute(np.arange(start - e * self.n, stop - e * self.n, dtype=self.dtype), e, owned=True)
        out = np.empty(stop - start, dtype=self.dtype)
        j = start
        while j < stop:
            e = j // self.n
            end = min(stop, (e + 1) * self.n)
            out[j - start:end - start] = self.permute(np.arange(j - e * self.n, end - e * self.n, dtype=self.dtype), e,
                                                      owned=True)
            j = end
        return out


class ChoiceSequence:
    """The leaf (int8) at each of the first ``length`` positions of a split tree over ``weights``,
    computed when indexed: ``seq[t]``, ``seq[a:b]``, ``len(seq)``, ``np.asarray(seq)``."""

    def __init__(self, weights: Sequence[float], length: int):
        self.tree = SplitTree(weights)
        self.length = int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.length)
            if step != 1:
                return self[np.arange(start, stop, step)]
            out = np.empty(max(0, stop - start), dtype=np.int8)
            for leaf, _, offsets in self.tree.fill(start, max(start, stop)):
                out[offsets] = leaf
            return out
        if isinstance(key, (int, np.integer)):
            t = int(key) + (self.length if key < 0 else 0)
            if not 0 <= t < self.length:
                raise IndexError(f"position {key} of a sequence of {self.length}")
            return self.tree.descend_one(t)[0]
        positions = np.asarray(key, dtype=np.int64)
        if len(positions) and (positions.min() < 0 or positions.max() >= self.length):
            raise IndexError(f"positions outside 0..{self.length - 1}")
        return self.tree.descend(positions)[0].astype(np.int8)

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)
