"""Shared-prefix attention (Prefix Grouper, docs/math.md §8): a group of completions shares one copy of its prompt.

A packed token stream is a forest of *segments* stored in stream order: a prompt segment is a root, each of
its completions a child. A query at local position j of segment s attends to every key of s's ancestors and
to the keys of s at local positions ≤ j — nothing else. Deeper trees (a completion that is itself the prefix
of later turns) are the same structure with longer ancestor chains, so the kernels take ancestor and
descendant lists, not a two-level special case.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _checks
from ._backend import accepted_dtypes, implementation, kernels, resolve_backend, uses_kernels

__all__ = ["SharedPrefixLayout", "shared_prefix_attention"]


def _csr(lists: Sequence[Sequence[int]], device) -> Tuple[Tensor, Tensor]:
    """(ptr [len+1], values) int32 tensors of a list of int lists."""
    ptr = list(itertools.accumulate(map(len, lists), initial=0))
    values = [v for items in lists for v in items]
    return (torch.tensor(ptr, dtype=torch.int32, device=device),
            torch.tensor(values if values else [0], dtype=torch.int32, device=device))


@dataclass(frozen=True, eq=False)
class SharedPrefixLayout:
    """Segments of a packed stream of ``total_tokens`` tokens, stored in stream order.

    Host fields (tuples of ints): ``starts``, ``lengths``, ``parents`` (-1 for a root), one entry per segment;
    every parent precedes its children. Build with :meth:`from_groups` (one prompt + its completions per
    group) or :meth:`from_tree` (any forest). Device tables for the kernels come from :meth:`tables`.

    Checked on construction, however built: ints only (no float is rounded), lengths ≥ 1, starts packed back
    to back from 0, every parent -1 or an earlier segment (so no cycles); else TypeError / ValueError naming
    the entry.
    """

    starts: Tuple[int, ...]
    lengths: Tuple[int, ...]
    parents: Tuple[int, ...]
    device: torch.device = torch.device("cpu")
    _cache: Dict[tuple, Dict[str, Tensor]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Every host fact and device table is derived from these three tuples, so a bad entry would surface
        # far from here: an IndexError, a cycle that ``ancestors`` never leaves, or a silently wrong mask.
        lengths = self._ints("lengths", self.lengths, minimum=1, why="every segment needs at least one token")
        starts = self._ints("starts", self.starts, minimum=0, why="an offset into the stream")
        parents = self._ints("parents", self.parents)
        if not lengths:
            raise ValueError("a layout needs at least one segment, got none (lengths is empty)")
        if len(starts) != len(lengths) or len(parents) != len(lengths):
            raise ValueError(f"starts, lengths and parents must have one entry per segment, got {len(starts)}, "
                             f"{len(lengths)} and {len(parents)}")
        total = 0
        for i, (start, n) in enumerate(zip(starts, lengths)):
            if start != total:
                raise ValueError(f"starts[{i}] must be {total}: segments are packed back to back from 0 "
                                 f"(starts[i] = lengths[0] + … + lengths[i-1]), got {start}")
            total += n
        self._check_parents(parents)
        device = _checks.device(self.device)
        for name, value in (("starts", starts), ("lengths", lengths), ("parents", parents), ("device", device)):
            object.__setattr__(self, name, value)

    @staticmethod
    def _ints(name: str, values: object, minimum: Optional[int] = None, why: str = "") -> Tuple[int, ...]:
        """``values`` as a tuple of ints: a list or tuple of ints (NumPy or 0-d integer tensor scalars too), or a
        1-D integer tensor or NumPy array; never a float rounded to an int. Each ≥ ``minimum`` when given."""
        array = hasattr(values, "tolist") and hasattr(values, "ndim")  # a tensor or a NumPy array
        if not (array or _checks.is_list(values)):
            raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}")
        if array:
            if values.ndim != 1:
                raise ValueError(f"{name} must be 1-D (one entry per segment), got shape {tuple(values.shape)}")
            values = values.tolist()  # float or bool entries come back as Python floats / bools: rejected below
        out = []
        for k, x in enumerate(values):
            if isinstance(x, bool) or (isinstance(x, Tensor) and x.dtype == torch.bool):
                raise TypeError(f"{name}[{k}] must be an int, got bool {x!r}")
            try:
                value = x.__index__()  # exact integers only: 3.5 or 3.0 is an error, not 3
            except (AttributeError, TypeError, ValueError):
                raise TypeError(f"{name}[{k}] must be an int, got {type(x).__name__} {x!r}") from None
            if minimum is not None and value < minimum:
                raise ValueError(f"{name}[{k}] must be >= {minimum} ({why}), got {value}")
            out.append(value)
        return tuple(out)

    @staticmethod
    def _check_parents(parents: Tuple[int, ...]) -> None:
        """Each parent is -1 (a root) or an earlier segment: the segments form a forest in stream order."""
        S = len(parents)
        for i, p in enumerate(parents):
            if not -1 <= p < S:
                raise ValueError(f"parents[{i}] must be -1 (a root) or a segment index in [0, {S}), got {p}")
        for i, p in enumerate(parents):
            if p < i:
                continue
            chain, q = [i], p  # follow the parents from i: a segment seen again closes a cycle
            while q != -1 and q not in chain:
                chain.append(q)
                q = parents[q]
            if q != -1:
                cycle = " → ".join(str(s) for s in chain[chain.index(q):] + [q])
                raise ValueError(f"parents[{i}] must be -1 or an earlier segment (< {i}), got {p}: the parents "
                                 f"form a cycle {cycle} (each segment → its parent)")
            raise ValueError(f"parents[{i}] must be -1 or an earlier segment (< {i}), got {p}: every parent "
                             f"precedes its children in stream order")

    # --- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_tree(cls, lengths: Sequence[int], parents: Sequence[int], device=None) -> "SharedPrefixLayout":
        """A forest of segments in stream order: segment i has ``lengths[i]`` ≥ 1 tokens and parent
        ``parents[i]`` (< i, or -1 for a root)."""
        lengths = cls._ints("lengths", lengths, minimum=1, why="every segment needs at least one token")
        parents = cls._ints("parents", parents)
        if len(lengths) != len(parents):
            raise ValueError(f"lengths and parents must have one entry per segment, got {len(lengths)} and "
                             f"{len(parents)}")
        starts = tuple(itertools.accumulate(lengths[:-1], initial=0))
        return cls(starts, lengths, parents, "cpu" if device is None else device)  # checked on construction

    @classmethod
    def from_groups(cls, prompt_lengths: Sequence[int], completion_lengths: Sequence[Sequence[int]],
                    device=None) -> "SharedPrefixLayout":
        """Groups packed as ``[prompt_g | c_g1 | … | c_gG]``, one after another (docs/math.md §8).

        Args:
            prompt_lengths: P_g ≥ 1 per group.
            completion_lengths: per group, the lengths S_gi ≥ 1 of its G_g ≥ 1 completions.
        """
        at_least_one = "every prompt needs at least one token"
        prompt_lengths = cls._ints("prompt_lengths", prompt_lengths, minimum=1, why=at_least_one)
        if not _checks.is_list(completion_lengths):
            raise TypeError(f"completion_lengths must be a sequence of sequences of ints, got "
                            f"{type(completion_lengths).__name__}")
        if len(prompt_lengths) != len(completion_lengths):
            raise ValueError(f"prompt_lengths and completion_lengths must have one entry per group, got "
                             f"{len(prompt_lengths)} and {len(completion_lengths)}")
        lengths, parents = [], []
        for g, (p_len, comps) in enumerate(zip(prompt_lengths, completion_lengths)):
            comps = cls._ints(f"completion_lengths[{g}]", comps, minimum=1,
                              why="every completion needs at least one token")
            if len(comps) == 0:
                raise ValueError(f"group {g} has no completions; every group needs at least one")
            parents += [-1] + [len(lengths)] * len(comps)
            lengths += [p_len, *comps]
        return cls.from_tree(lengths, parents, device)

    def to(self, device) -> "SharedPrefixLayout":
        """The same layout with its device tables on ``device``. The copy shares this layout's table cache
        (keyed by device), so moving a layout every step builds its tables only once per device."""
        return SharedPrefixLayout(self.starts, self.lengths, self.parents, torch.device(device), self._cache)

    # --- derived host facts ---------------------------------------------------------------------------

    @property
    def num_segments(self) -> int:
        return len(self.lengths)

    @property
    def total_tokens(self) -> int:
        return self.starts[-1] + self.lengths[-1]

    def _segment(self, segment: object) -> int:
        """``segment`` checked to be a segment index in [0, S) (a negative index would silently wrap)."""
        if not 0 <= _checks.integer("segment", segment) < self.num_segments:
            raise ValueError(f"segment must lie in [0, {self.num_segments}), got {segment}")
        return segment

    def ancestors(self, segment: int) -> List[int]:
        """Ancestors of ``segment``, root first."""
        chain = []
        segment = self._segment(segment)
        p = self.parents[segment]
        while p != -1:
            chain.append(p)
            p = self.parents[p]
        return chain[::-1]

    def descendants(self, segment: int) -> List[int]:
        """Every segment below ``segment``, in stream order."""
        segment = self._segment(segment)
        below, inside = [], {segment}
        for s in range(segment + 1, self.num_segments):
            if self.parents[s] in inside:
                below.append(s)
                inside.add(s)
        return below

    def _context_lengths(self) -> List[int]:
        """Per segment, the tokens of its ancestors: where its positions start in its own sequence."""
        above: List[int] = []
        for p in self.parents:  # every parent precedes its children
            above.append(0 if p == -1 else above[p] + self.lengths[p])
        return above

    def position_ids(self) -> Tensor:
        """[total_tokens] int64: a token's position in its own root-to-segment sequence (each completion
        restarts at its prompt's length)."""
        return torch.cat([torch.arange(a, a + n) for a, n in zip(self._context_lengths(), self.lengths)]).to(
            self.device)

    def dense_mask(self) -> Tensor:
        """[T, T] bool: mask[i, j] = query i may attend to key j. For tests and the reference only."""
        T = self.total_tokens
        mask = torch.zeros(T, T, dtype=torch.bool)
        for s in range(self.num_segments):
            rows = slice(self.starts[s], self.starts[s] + self.lengths[s])
            for a in self.ancestors(s):
                mask[rows, self.starts[a]: self.starts[a] + self.lengths[a]] = True
            n = self.lengths[s]
            mask[rows, rows] = torch.ones(n, n, dtype=torch.bool).tril()
        return mask.to(self.device)

    def attention_flops(self, head_dim: int, num_heads: int) -> int:
        """Forward FLOPs of the visible (query, key) pairs: 4·d·H per pair (QKᵀ and PV)."""
        head_dim = _checks.integer("head_dim", head_dim, minimum=1)
        num_heads = _checks.integer("num_heads", num_heads, minimum=1)
        pairs = sum(n * a + n * (n + 1) // 2 for a, n in zip(self._context_lengths(), self.lengths))
        return 4 * head_dim * num_heads * pairs

    # --- device tables for the kernels ----------------------------------------------------------------

    def tables(self, block: int) -> Dict[str, Tensor]:
        """int32 device tables for kernels that tile each segment into blocks of ``block`` tokens (blocks
        never cross a segment boundary), cached per block size: ``seg_start``, ``seg_len`` [S];
        ``block_segment``, ``block_start`` [num_blocks] (each block's segment and first token); ``anc_ptr`` [S+1]
        / ``anc`` and ``desc_ptr`` [S+1] / ``desc``, each segment's ancestors and descendants (CSR);
        ``query_block_order`` / ``key_block_order`` [num_blocks], the blocks heaviest first by the keys a query
        block sees / the queries that see a key block (docs/api/shared_prefix_attention.md, "Kernel design").
        """
        key = (_checks.integer("block", block, minimum=1), str(self.device))
        if key not in self._cache:
            ancestors = [self.ancestors(s) for s in range(self.num_segments)]
            context = self._context_lengths()
            descendants = [[] for _ in range(self.num_segments)]
            for s in range(self.num_segments):  # stream order: each list comes out in stream order
                for a in ancestors[s]:
                    descendants[a].append(s)
            block_segment, block_start, query_work, key_work = [], [], [], []
            for s in range(self.num_segments):
                start, end = self.starts[s], self.starts[s] + self.lengths[s]
                below = sum(self.lengths[c] for c in descendants[s])
                for b in range(start, end, block):
                    block_segment.append(s)
                    block_start.append(b)
                    query_work.append(context[s] + min(b + block, end) - start)
                    key_work.append(end - b + below)
            heaviest_first = lambda work: sorted(range(len(work)), key=lambda i: -work[i])  # noqa: E731
            as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int32, device=self.device)  # noqa: E731
            anc_ptr, anc = _csr(ancestors, self.device)
            desc_ptr, desc = _csr(descendants, self.device)
            self._cache[key] = dict(
                seg_start=as_tensor(self.starts), seg_len=as_tensor(self.lengths),
                block_segment=as_tensor(block_segment), block_start=as_tensor(block_start),
                anc_ptr=anc_ptr, anc=anc, desc_ptr=desc_ptr, desc=desc,
                query_block_order=as_tensor(heaviest_first(query_work)),
                key_block_order=as_tensor(heaviest_first(key_work)),
            )
        return self._cache[key]

    def kernel_tables(self, blocks: Sequence[int]) -> Dict[str, object]:
        """The :meth:`tables` of every block size in ``blocks`` in one set, for kernels that choose their block
        size at launch (autotuned). Cached per set of sizes.

        The segment tables (``seg_start``, ``seg_len``, ``anc_ptr``/``anc``, ``desc_ptr``/``desc``) once;
        ``block_segment``, ``block_start``, ``query_block_order`` and ``key_block_order`` of each size one
        after another, the orders indexing the joined block tables; ``block_first`` [max(blocks) + 1] int32,
        whose entry b is where the b-token blocks start in the orders; ``num_blocks``, a dict {b: number of
        b-token blocks} of host ints (the launch grid).
        """
        sizes = tuple(sorted({_checks.integer("block", b, minimum=1) for b in blocks}))
        key = ("kernel", sizes, str(self.device))
        if key not in self._cache:
            parts = [self.tables(b) for b in sizes]
            counts = [part["block_segment"].numel() for part in parts]
            offsets = [sum(counts[:i]) for i in range(len(sizes))]
            first = [0] * (sizes[-1] + 1)
            for b, offset in zip(sizes, offsets):
                first[b] = offset
            joined = {name: parts[0][name] for name in ("seg_start", "seg_len", "anc_ptr", "anc", "desc_ptr", "desc")}
            for name in ("block_segment", "block_start"):
                joined[name] = torch.cat([part[name] for part in parts])
            for name in ("query_block_order", "key_block_order"):
                joined[name] = torch.cat([part[name] + offset for part, offset in zip(parts, offsets)])
            joined["block_first"] = torch.tensor(first, dtype=torch.int32, device=self.device)
            joined["num_blocks"] = dict(zip(sizes, counts))
            self._cache[key] = joined
        return self._cache[key]


# --- torch backend ------------------------------------------------------------------------------------
#
# Query blocks of `block` consecutive tokens (a block may cross segment boundaries), each against the keys its
# queries see; blocks with similar key counts form a bucket, one masked SDPA call per bucket. Why this shape
# (not a call per segment, FlexAttention or a dense mask): docs/api/shared_prefix_attention.md, "The torch
# backend (CPU)".

# Candidate query-block sizes; the plan takes the cheapest by the cost model below.
_TORCH_BLOCKS = (16, 32, 64, 128, 256)
# The cost model of a plan, in estimated nanoseconds of forward + backward (float32, d = 64; only the ratios
# steer the choice): per (query, key) pair, q head and head-dim lane, divided among the intra-op threads; per
# gathered key row, kv head and lane, which does not shrink with threads; per SDPA call, which grows with them.
# Fitted on a 2-core x86 CPU to pick the fastest block of 7 layouts at 1 and 2 threads (timed interleaved, idle
# machine): a model fitted at one thread only picked 64-row blocks where one 256-row call is 10–16% faster at 2.
_NS_PER_PAIR = 0.26
_NS_PER_KEY_ROW = 10.0
_NS_PER_CALL = 250_000.0
# Key counts are binned on a geometric grid of this ratio before the buckets are chosen (exactly, by dynamic
# programming over the bins).
_BUCKET_GRID = 1.25
# Intra-op threads on a busy machine: at most one per this many estimated nanoseconds of work (a parallel region
# waits a scheduler slice for a descheduled OpenMP thread there; docs/api/shared_prefix_attention.md, "Threads").
_NS_PER_THREAD = 4_000_000.0


def _preorder_spans(parents: Sequence[int]) -> Tuple[List[int], List[int]]:
    """(enter, leave) of every segment in a preorder numbering of the forest (children in stream order):
    segment a is segment s or one of its ancestors iff enter[a] ≤ enter[s] < leave[a]."""
    size = [1] * len(parents)
    for s in range(len(parents) - 1, -1, -1):  # every parent precedes its children
        if parents[s] != -1:
            size[parents[s]] += size[s]
    enter, free, used = [], [], 0  # free[s]: the next unnumbered entry of s's span
    for s, p in enumerate(parents):
        if p == -1:
            enter.append(used)
            used += size[s]
        else:
            enter.append(free[p])
            free[p] += size[s]
        free.append(enter[s] + 1)
    return enter, [e + n for e, n in zip(enter, size)]


def _block_key_ranges(layout: SharedPrefixLayout, block: int) -> List[List[Tuple[int, int]]]:
    """Per query block of ``block`` tokens, the (first token, count) ranges of the keys its queries see, in
    stream order: each ancestor of a segment in the block in full, each segment in the block up to the block's
    end. Linear in the segments and blocks (an ancestor chain is walked only up to a segment already taken)."""
    starts, lengths, parents = layout.starts, layout.lengths, layout.parents
    T, S = layout.total_tokens, layout.num_segments
    ranges, first = [], 0
    for lo in range(0, T, block):
        hi = min(lo + block, T)
        while starts[first] + lengths[first] <= lo:
            first += 1
        extent: Dict[int, int] = {}
        s = first
        while s < S and starts[s] < hi:
            a = parents[s]
            while a != -1 and a not in extent:  # a taken segment's ancestors are taken already
                extent[a] = lengths[a]
                a = parents[a]
            extent[s] = min(starts[s] + lengths[s], hi) - starts[s]
            s += 1
        ranges.append([(starts[a], extent[a]) for a in sorted(extent)])
    return ranges


def _buckets(block_keys: List[int], ns_per_key: float, ns_per_call: float) -> Tuple[float, List[List[int]]]:
    """(estimated ns, buckets): the blocks grouped into buckets, each padded to its largest key count, at the
    least cost ``Σ (ns_per_call + blocks · K · ns_per_key)``. Exact over key counts binned on the
    `_BUCKET_GRID` grid: a bucket is a run of consecutive bins (dynamic programming over ≤ log_1.25(T) bins)."""
    bins: Dict[int, List[int]] = {}
    for b, n in enumerate(block_keys):
        bins.setdefault(int(math.log(n) / math.log(_BUCKET_GRID)), []).append(b)
    levels = sorted(bins)
    sizes = [len(bins[level]) for level in levels]
    widths = [max(block_keys[b] for b in bins[level]) for level in levels]
    # best[i]: the cheapest cover of levels[:i]; cut[i]: where its last bucket starts.
    best, cut = [0.0] + [math.inf] * len(levels), [0] * (len(levels) + 1)
    for i in range(1, len(levels) + 1):
        count = 0
        for j in range(i - 1, -1, -1):
            count += sizes[j]
            cost = best[j] + ns_per_call + count * widths[i - 1] * ns_per_key
            if cost < best[i]:
                best[i], cut[i] = cost, j
    buckets, i = [], len(levels)
    while i > 0:
        buckets.append(sorted(b for level in levels[cut[i]:i] for b in bins[level]))
        i = cut[i]
    return best[-1], buckets


def _torch_plan(layout: SharedPrefixLayout, heads: Tuple[int, int, int], block: Optional[int] = None,
                threads: int = 1) -> dict:
    """The torch backend's plan for (Hq, Hkv, d) = ``heads``, built on the host once and cached on the layout
    per device and intra-op thread count ``threads`` (``block`` forces a query-block size, for tests):

    ``block``; ``ns``, the estimated single-core time of forward + backward; ``order`` [blocks] int64, the
    blocks bucket after bucket, and ``restore``, its inverse permutation; ``keys`` [Σ n·K] int64, the key
    token of every (block, slot) of every bucket in turn (padded slots point at token 0); ``masks``, per
    bucket of n blocks padded to K keys, [n, 1, group·block, K] bool: row g·block + r of a block b (q head g
    of its kv group, token block·b + r) sees slot j. Rows past the stream's end see slot 0 only (no fully
    masked row, so no NaN)."""
    cache_key = ("torch", heads, block, threads, str(layout.device))
    if cache_key in layout._cache:
        return layout._cache[cache_key]
    Hq, Hkv, d = heads
    choices = {}
    for size in _TORCH_BLOCKS if block is None else (block,):
        ranges = _block_key_ranges(layout, size)
        ns, buckets = _buckets([sum(n for _, n in r) for r in ranges],
                               d * (size * Hq * _NS_PER_PAIR / threads + Hkv * _NS_PER_KEY_ROW),
                               _NS_PER_CALL * threads)
        choices[size] = (ns, ranges, buckets)
    block = min(choices, key=lambda size: choices[size][0])
    _, ranges, buckets = choices[block]
    order = [b for members in buckets for b in members]
    widths = [max(sum(n for _, n in ranges[b]) for b in members) for members in buckets]
    ns = sum(_NS_PER_CALL + len(members) * K * d * (block * Hq * _NS_PER_PAIR + Hkv * _NS_PER_KEY_ROW)
             for members, K in zip(buckets, widths))  # on one core
    # Key tokens of every (block, slot), flattened in `order`: the i-th key of all the blocks' ranges is token
    # i + (its range's start − the range's first i), in slot i + (its block's first slot − the block's first i).
    spans = [ranges[b] for b in order]
    counts = torch.tensor([n for r in spans for _, n in r])
    block_keys = torch.tensor([sum(n for _, n in r) for r in spans])
    width = torch.repeat_interleave(torch.tensor(widths), torch.tensor([len(m) for m in buckets]))
    token_shift = torch.tensor([s for r in spans for s, _ in r]) - (torch.cumsum(counts, 0) - counts)
    slot_shift = (torch.cumsum(width, 0) - width) - (torch.cumsum(block_keys, 0) - block_keys)
    index = torch.arange(int(counts.sum()))
    slot = index + torch.repeat_interleave(slot_shift, block_keys)
    keys = torch.zeros(int(width.sum()), dtype=torch.long)
    keys[slot] = index + torch.repeat_interleave(token_shift, counts)
    valid = torch.zeros(int(width.sum()), dtype=torch.bool)
    valid[slot] = True
    # Query token i sees key token j iff j ≤ i and seg(j) is seg(i) or one of its ancestors.
    T = layout.total_tokens
    enter, leave = (torch.tensor(x) for x in _preorder_spans(layout.parents))
    segment = torch.repeat_interleave(torch.arange(layout.num_segments), torch.tensor(layout.lengths))
    masks, done = [], 0
    for members, K in zip(buckets, widths):
        n = len(members)
        key = keys[done: done + n * K].view(n, 1, K)
        query = torch.tensor(members).view(n, 1, 1) * block + torch.arange(block).view(1, block, 1)
        q_enter, k_seg = enter[segment[query.clamp(max=T - 1)]], segment[key]
        mask = valid[done: done + n * K].view(n, 1, K) & (key <= query) & (enter[k_seg] <= q_enter) & (
            q_enter < leave[k_seg])
        if members[-1] == len(ranges) - 1:  # the last block: its rows past the stream's end see slot 0
            mask[-1, T - members[-1] * block:] = torch.arange(K) == 0
        masks.append(mask[:, None].repeat(1, 1, Hq // Hkv, 1).to(layout.device))
        done += n * K
    order_t = torch.tensor(order)
    plan = dict(block=block, ns=ns, order=order_t.to(layout.device), keys=keys.to(layout.device), masks=masks,
                restore=torch.argsort(order_t).to(layout.device))
    layout._cache[cache_key] = plan
    return plan


def _blocked_attention(q: Tensor, k: Tensor, v: Tensor, plan: dict, scale: float) -> Tensor:
    """The plan's buckets through SDPA, with autograd. Grouped-query heads are folded into the query rows
    ([n, Hkv, group·block, d]), so K/V are gathered once per kv head, never repeated per q head. One gather
    of K, V and of the query blocks for all buckets: autograd sums a prompt key's gradient over every block
    that gathered it in one index_put with accumulation (deterministic)."""
    cd = _checks.compute_dtype(q.dtype)
    T, Hq, d = q.shape
    Hkv = k.shape[1]
    group, block = Hq // Hkv, plan["block"]
    num_blocks = -(-T // block)
    queries = torch.nn.functional.pad(q.to(cd), (0, 0, 0, 0, 0, num_blocks * block - T))
    queries = queries.view(num_blocks, block, Hkv, group, d)
    masks = plan["masks"]
    if len(masks) > 1:
        queries = queries[plan["order"]]
    slots = [mask.shape[0] * mask.shape[-1] for mask in masks]
    keys, values = k.to(cd)[plan["keys"]].split(slots), v.to(cd)[plan["keys"]].split(slots)
    outs = []
    for q_b, k_b, v_b, mask in zip(queries.split([mask.shape[0] for mask in masks]), keys, values, masks):
        n, K = mask.shape[0], mask.shape[-1]
        o = torch.nn.functional.scaled_dot_product_attention(
            q_b.permute(0, 2, 3, 1, 4).reshape(n, Hkv, group * block, d),         # row g·block + r
            k_b.view(n, K, Hkv, d).transpose(1, 2), v_b.view(n, K, Hkv, d).transpose(1, 2),
            attn_mask=mask, scale=scale)
        outs.append(o.view(n, Hkv, group, block, d).permute(0, 3, 1, 2, 4))      # [n, block, Hkv, group, d]
    out = outs[0] if len(outs) == 1 else torch.cat(outs)[plan["restore"]]
    return out.reshape(num_blocks * block, Hq, d)[:T].to(q.dtype)


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (e.g. a benchmark's worker processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# (wall clock, CPU time) when the module was imported: this process's own average busy threads since.
_CLOCKS_AT_IMPORT = (time.monotonic(), _cpu_seconds())


def _other_load() -> float:
    """The busy threads of other processes, estimated: the 1-minute load average less this process's own
    average busy threads (CPU time over wall time since import). inf where the OS reports no load average."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows)
        return math.inf
    wall = time.monotonic() - _CLOCKS_AT_IMPORT[0]
    own = (_cpu_seconds() - _CLOCKS_AT_IMPORT[1]) / wall if wall > 0 else 0.0
    return load - own


def _torch_threads(plan: dict) -> int:
    """The intra-op threads the plan runs on (on CPU): torch's count while the other processes leave a core
    for each of them (by half a thread); else capped at one per `_NS_PER_THREAD` of estimated work."""
    threads = torch.get_num_threads()
    if _other_load() + threads < (os.cpu_count() or 1) + 0.5:
        return threads
    return max(1, min(threads, int(plan["ns"] // _NS_PER_THREAD)))


@contextlib.contextmanager
def _intra_op_threads(threads: int):
    before = torch.get_num_threads()
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class _FewerThreads(torch.autograd.Function):
    """`_blocked_attention` with ``threads`` intra-op threads in its forward and in its backward (the CPU
    autograd engine runs the backward on the calling thread, outside any scope set in the forward)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale, threads):
        with _intra_op_threads(threads), torch.enable_grad():
            leaves = [x.detach().requires_grad_(need) for x, need in zip((q, k, v), ctx.needs_input_grad)]
            out = _blocked_attention(*leaves, plan, scale)
        ctx.leaves, ctx.out, ctx.threads = leaves, out, threads
        return out.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        wanted = [x for x in ctx.leaves if x.requires_grad]
        with _intra_op_threads(ctx.threads):
            grads = iter(torch.autograd.grad(ctx.out, wanted, do))
        return (*(next(grads) if x.requires_grad else None for x in ctx.leaves), None, None, None)


def _torch_attention(q: Tensor, k: Tensor, v: Tensor, layout: SharedPrefixLayout, scale: float,
                     block: Optional[int] = None) -> Tensor:
    """Query blocks against their gathered visible keys, one masked SDPA call per bucket (see above), in
    float32 (float64 for float64 inputs). On a busy CPU a small problem runs on fewer intra-op threads,
    forward and backward: at most one per `_NS_PER_THREAD` of estimated work. ``block`` forces a query-block
    size (tests)."""
    heads = (q.shape[1], k.shape[1], q.shape[2])
    threads = torch.get_num_threads() if q.device.type == "cpu" else 1
    plan = _torch_plan(layout, heads, block, threads)
    if q.device.type == "cpu" and _torch_threads(plan) != threads:  # a busy machine: plan for fewer threads
        threads = _torch_threads(plan)
        plan = _torch_plan(layout, heads, block, threads)
    if q.device.type != "cpu" or threads == torch.get_num_threads():
        return _blocked_attention(q, k, v, plan, scale)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return _FewerThreads.apply(q, k, v, plan, scale, threads)
    with _intra_op_threads(threads):
        return _blocked_attention(q, k, v, plan, scale)


# --- autograd over the kernels ------------------------------------------------------------------------


class _SharedPrefixAttention(torch.autograd.Function):
    """O [T, Hq, d] from q [T, Hq, d], k, v [T, Hkv, d] on the Triton kernels. Saves the inputs (no copies),
    O and the per-row lse [Hq, T] float32; the backward recomputes the attention weights from them."""

    @staticmethod
    def forward(ctx, q, k, v, layout, scale, deterministic):
        o, lse = kernels("prefix_attention").attention_forward(q, k, v, layout.kernel_tables, scale=scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout, ctx.scale, ctx.deterministic = layout, scale, deterministic
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = kernels("prefix_attention").attention_backward(
            do, q, k, v, o, lse, ctx.layout.kernel_tables, scale=ctx.scale, deterministic=ctx.deterministic)
        return dq, dk, dv, None, None, None


# --- public API ---------------------------------------------------------------------------------------

# Head dims the kernels take: one register tile of the next power of two ≥ 16 (padded lanes masked).
_MIN_HEAD_DIM, _MAX_HEAD_DIM = 16, 128


def shared_prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: SharedPrefixLayout,
    *,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
    deterministic: bool = True,
) -> Tensor:
    """Attention over a packed stream of prompts and their completions, each prompt held once (docs/math.md §8).

    Outputs and gradients equal running every ``[prompt | completion]`` (root-to-segment) sequence separately
    through causal attention (docs/api/shared_prefix_attention.md, "The layout").

    Args:
        q: [T, Hq, d] queries, T = ``layout.total_tokens``; float16, bfloat16, float32 (float64 on
            ``torch``/``reference``).
        k, v: [T, Hkv, d] keys and values, q's dtype; Hq a multiple of Hkv (grouped-query attention).
        layout: the :class:`SharedPrefixLayout` of the stream.
        scale: softmax scale, default 1/√d.
        backend: "triton", "torch" or "reference"; default from ``RLLOSS_BACKEND`` or the device.
        deterministic: True (default): bitwise reproducible gradients. False lets the kernel backends form dQ
            with float32 atomics inside the dK/dV pass: fewer FLOPs, dQ's last bits vary from run to run
            (docs/design/prefix_attention.md). ``torch`` and ``reference`` are deterministic either way.

    Returns:
        [T, Hq, d] in q's dtype, differentiable w.r.t. q, k and v.
    """
    q, k, v = (_checks.tensor(n, x) for n, x in (("q", q), ("k", k), ("v", v)))
    _checks.instance("layout", layout, SharedPrefixLayout, "a rlloss.SharedPrefixLayout")
    for n, x, shape in (("q", q, "[T, Hq, d]"), ("k", k, "[T, Hkv, d]"), ("v", v, "[T, Hkv, d]")):
        _checks.ndim(n, x, 3, shape)
    T, Hq, d = q.shape
    if T != layout.total_tokens:
        raise ValueError(f"q must have layout.total_tokens = {layout.total_tokens} rows, got {T}")
    if d == 0 or Hq == 0 or k.shape[1] == 0:
        raise ValueError(f"q and k need at least one head and a head dim d >= 1, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)} (Hq = {Hq}, Hkv = {k.shape[1]}, d = {d})")
    if k.shape != v.shape or k.shape[0] != T or k.shape[2] != d:
        raise ValueError(f"k and v must both be [T, Hkv, d] = [{T}, Hkv, {d}], got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"q's heads Hq = {Hq} must be a multiple of k's heads Hkv = {k.shape[1]}")
    _checks.same_device(q=q, k=k, v=v)
    name = resolve_backend(backend, q.device)
    _checks.dtype_in("q", q, accepted_dtypes(name))
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k and v must have q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")
    if uses_kernels(name) and not _MIN_HEAD_DIM <= d <= _MAX_HEAD_DIM:
        raise ValueError(f"head dim d must be in [{_MIN_HEAD_DIM}, {_MAX_HEAD_DIM}] on the kernel backends "
                         f"(e.g. 64, 80, 96, 128), got {d}")
    scale = 1.0 / math.sqrt(d) if scale is None else _checks.positive_finite("scale", scale)
    deterministic = _checks.boolean("deterministic", deterministic)
    if layout.device != q.device:
        layout = layout.to(q.device)

    return implementation(_IMPLEMENTATIONS, name)(q, k, v, layout, scale, deterministic)


# One signature for every backend: checked q, k, v, the layout on q's device, the scale and ``deterministic``.


def _reference_attention(q, k, v, layout, scale, deterministic):
    from . import reference

    return reference.shared_prefix_attention(q, k, v, layout.dense_mask(), scale=scale)


def _torch_backend_attention(q, k, v, layout, scale, deterministic):  # deterministic either way
    return _torch_attention(q, k, v, layout, scale)


_IMPLEMENTATIONS = dict(reference=_reference_attention, torch=_torch_backend_attention,
                        kernel=_SharedPrefixAttention.apply)
