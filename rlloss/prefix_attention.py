"""Shared-prefix attention (Prefix Grouper, MATH.md §8): a group of completions shares one copy of its prompt.

A packed token stream is a forest of *segments* stored in stream order: a prompt segment is a root, each of
its completions a child. A query at local position j of segment s attends to every key of s's ancestors and
to the keys of s at local positions ≤ j — nothing else. Deeper trees (a completion that is itself the prefix
of later turns) are the same structure with longer ancestor chains, so the kernels take ancestor and
descendant lists, not a two-level special case.

Layout of this module: :class:`SharedPrefixLayout` (host-built once per batch, device tables for the
kernels), the ``torch`` backend, the autograd function over the Triton kernels of
``rlloss.kernels.prefix_attention``, and the public :func:`shared_prefix_attention`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _checks
from ._backend import resolve_backend

__all__ = ["SharedPrefixLayout", "shared_prefix_attention"]


def _csr(lists: Sequence[Sequence[int]], device) -> Tuple[Tensor, Tensor]:
    """(ptr [len+1], values) int32 tensors of a list of int lists."""
    ptr = [0]
    for items in lists:
        ptr.append(ptr[-1] + len(items))
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
        try:
            device = torch.device(self.device)
        except (TypeError, RuntimeError):
            error = ValueError if isinstance(self.device, str) else TypeError
            raise error(f"device must be a torch.device or a device string such as 'cuda:0', got {self.device!r}") \
                from None
        for name, value in (("starts", starts), ("lengths", lengths), ("parents", parents), ("device", device)):
            object.__setattr__(self, name, value)

    @staticmethod
    def _ints(name: str, values: object, minimum: Optional[int] = None, why: str = "") -> Tuple[int, ...]:
        """``values`` as a tuple of ints: a list or tuple of ints (NumPy or 0-d integer tensor scalars too), or a
        1-D integer tensor or NumPy array; never a float rounded to an int. Each ≥ ``minimum`` when given."""
        array = hasattr(values, "tolist") and hasattr(values, "ndim")  # a tensor or a NumPy array
        if isinstance(values, (str, bytes)) or not (array or isinstance(values, Sequence)):
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
        starts, total = [], 0
        for n in lengths:
            starts.append(total)
            total += n
        return cls(tuple(starts), lengths, parents, "cpu" if device is None else device)  # checked on construction

    @classmethod
    def from_groups(cls, prompt_lengths: Sequence[int], completion_lengths: Sequence[Sequence[int]],
                    device=None) -> "SharedPrefixLayout":
        """Groups packed as ``[prompt_g | c_g1 | … | c_gG]``, one after another (MATH.md §8).

        Args:
            prompt_lengths: P_g ≥ 1 per group.
            completion_lengths: per group, the lengths S_gi ≥ 1 of its G_g ≥ 1 completions.
        """
        at_least_one = "every prompt needs at least one token"
        prompt_lengths = cls._ints("prompt_lengths", prompt_lengths, minimum=1, why=at_least_one)
        if isinstance(completion_lengths, (str, bytes, Tensor)) or not isinstance(completion_lengths, Sequence):
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
            root = len(lengths)
            lengths.append(p_len)
            parents.append(-1)
            for s_len in comps:
                lengths.append(s_len)
                parents.append(root)
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
        if isinstance(segment, bool) or not isinstance(segment, int):
            raise TypeError(f"segment must be an int, got {type(segment).__name__}")
        if not 0 <= segment < self.num_segments:
            raise ValueError(f"segment must lie in [0, {self.num_segments}), got {segment}")
        return segment

    @staticmethod
    def _positive(name: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
        return value

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

    def position_ids(self) -> Tensor:
        """[total_tokens] int64: a token's position in its own root-to-segment sequence (each completion
        restarts at its prompt's length)."""
        pieces = []
        for s in range(self.num_segments):
            offset = sum(self.lengths[a] for a in self.ancestors(s))
            pieces.append(torch.arange(offset, offset + self.lengths[s]))
        return torch.cat(pieces).to(self.device)

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
        head_dim, num_heads = self._positive("head_dim", head_dim), self._positive("num_heads", num_heads)
        pairs = 0
        for s in range(self.num_segments):
            n = self.lengths[s]
            pairs += n * sum(self.lengths[a] for a in self.ancestors(s)) + n * (n + 1) // 2
        return 4 * head_dim * num_heads * pairs

    # --- device tables for the kernels ----------------------------------------------------------------

    def tables(self, block: int) -> Dict[str, Tensor]:
        """int32 device tables for kernels that tile each segment into blocks of ``block`` tokens (blocks
        never cross a segment boundary). Cached per block size.

        ``seg_start``, ``seg_len`` [S]; ``block_segment``, ``block_start`` [num_blocks] (the segment of each
        block and its first token); ``anc_ptr`` [S+1] / ``anc`` (CSR: ancestors of each segment, whose keys
        a query sees in full); ``desc_ptr`` [S+1] / ``desc`` (CSR: descendants, whose queries see a key in
        full); ``query_block_order`` / ``key_block_order`` [num_blocks]: the block indices sorted by the
        work of a block of queries (keys it sees) / of keys (queries that see them), heaviest first, so the
        kernels start the long programs — a prompt's key blocks — first.
        """
        key = (self._positive("block", block), str(self.device))
        if key not in self._cache:
            ancestors = [self.ancestors(s) for s in range(self.num_segments)]
            descendants = [[] for _ in range(self.num_segments)]
            for s in range(self.num_segments):  # stream order: each list comes out in stream order
                for a in ancestors[s]:
                    descendants[a].append(s)
            block_segment, block_start, query_work, key_work = [], [], [], []
            for s in range(self.num_segments):
                start, end = self.starts[s], self.starts[s] + self.lengths[s]
                above = sum(self.lengths[a] for a in ancestors[s])
                below = sum(self.lengths[c] for c in descendants[s])
                for b in range(start, end, block):
                    block_segment.append(s)
                    block_start.append(b)
                    query_work.append(above + min(b + block, end) - start)
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


# --- torch backend ------------------------------------------------------------------------------------


def _torch_attention(q: Tensor, k: Tensor, v: Tensor, layout: SharedPrefixLayout, scale: float) -> Tensor:
    """Per segment: its queries against [ancestor keys | own keys (causal)], through autograd.

    The prompt's K/V are sliced, never repeated in memory; autograd sums their gradients over every query
    that saw them. Computed in float32 (float64 for float64 inputs).
    """
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    pieces = []
    for s in range(layout.num_segments):
        begin, n = layout.starts[s], layout.lengths[s]
        visible = [slice(layout.starts[a], layout.starts[a] + layout.lengths[a]) for a in layout.ancestors(s)]
        visible.append(slice(begin, begin + n))
        keys = torch.cat([k[r] for r in visible]).to(cd).repeat_interleave(group, dim=1)  # [Lk, Hq, d]
        values = torch.cat([v[r] for r in visible]).to(cd).repeat_interleave(group, dim=1)
        queries = q[begin: begin + n].to(cd)                                                  # [n, Hq, d]
        scores = torch.einsum("qhd,khd->hqk", queries, keys) * scale
        prefix = keys.shape[0] - n
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        allowed = torch.cat([torch.ones(n, prefix, dtype=torch.bool, device=q.device), causal], dim=1)
        scores = scores.masked_fill(~allowed, float("-inf"))
        pieces.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(q.dtype))
    return torch.cat(pieces)


# --- autograd over the kernels ------------------------------------------------------------------------


def _kernels():
    from .kernels import prefix_attention as kernels

    return kernels


class _SharedPrefixAttention(torch.autograd.Function):
    """O [T, Hq, d] from q [T, Hq, d], k, v [T, Hkv, d] on the Triton kernels. Saves the inputs (no copies),
    O and the per-row lse [Hq, T] float32; the backward recomputes the attention weights from them."""

    @staticmethod
    def forward(ctx, q, k, v, layout, scale):
        o, lse = _kernels().attention_forward(q, k, v, layout.tables, scale=scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout, ctx.scale = layout, scale
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _kernels().attention_backward(do, q, k, v, o, lse, ctx.layout.tables, scale=ctx.scale)
        return dq, dk, dv, None, None


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
) -> Tensor:
    """Attention over a packed stream of prompts and their completions, each prompt held once (MATH.md §8).

    A query at position j of a completion attends to all keys of its prompt (and, in deeper trees, of every
    ancestor segment) and to the keys of its own completion at positions ≤ j; prompt queries attend causally
    within the prompt. The result and the gradients equal running every ``[prompt | completion]`` sequence
    separately through causal attention; the prompt's K/V gradient is the sum over every query that saw it.

    Args:
        q: [T, Hq, d] queries, T = ``layout.total_tokens``; float16, bfloat16, float32 (float64 on
            ``torch``/``reference``).
        k, v: [T, Hkv, d] keys and values, q's dtype; Hq a multiple of Hkv (grouped-query attention).
        layout: the :class:`SharedPrefixLayout` of the stream.
        scale: softmax scale, default 1/√d.
        backend: "triton", "interpret", "torch" or "reference"; default from ``RLLOSS_BACKEND`` or the device.

    Returns:
        [T, Hq, d] in q's dtype, differentiable w.r.t. q, k and v.
    """
    q, k, v = (_checks.tensor(n, x) for n, x in (("q", q), ("k", k), ("v", v)))
    if not isinstance(layout, SharedPrefixLayout):
        raise TypeError(f"layout must be a rlloss.SharedPrefixLayout, got {type(layout).__name__}")
    _checks.ndim("q", q, 3, "[T, Hq, d]")
    _checks.ndim("k", k, 3, "[T, Hkv, d]")
    _checks.ndim("v", v, 3, "[T, Hkv, d]")
    T, Hq, d = q.shape
    if T != layout.total_tokens:
        raise ValueError(f"q must have layout.total_tokens = {layout.total_tokens} rows, got {T}")
    if k.shape != v.shape or k.shape[0] != T or k.shape[2] != d:
        raise ValueError(f"k and v must both be [T, Hkv, d] = [{T}, Hkv, {d}], got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"q's heads Hq = {Hq} must be a multiple of k's heads Hkv = {k.shape[1]}")
    _checks.same_device(q=q, k=k, v=v)
    name = resolve_backend(backend, q.device)
    allowed = _checks.KERNEL_DTYPES if name in ("triton", "interpret") else _checks.FLOAT_DTYPES
    _checks.dtype_in("q", q, allowed)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k and v must have q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")
    if name in ("triton", "interpret") and not _MIN_HEAD_DIM <= d <= _MAX_HEAD_DIM:
        raise ValueError(f"head dim d must be in [{_MIN_HEAD_DIM}, {_MAX_HEAD_DIM}] on the kernel backends "
                         f"(e.g. 64, 80, 96, 128), got {d}")
    scale = 1.0 / math.sqrt(d) if scale is None else _checks.positive_finite("scale", scale)
    if layout.device != q.device:
        layout = layout.to(q.device)

    if name == "reference":
        from . import reference

        return reference.shared_prefix_attention(q, k, v, layout.dense_mask(), scale=scale)
    if name == "torch":
        return _torch_attention(q, k, v, layout, scale)
    return _SharedPrefixAttention.apply(q, k, v, layout, scale)
