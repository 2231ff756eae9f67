"""Packing groups of completions that share a prompt into one shared-prefix stream (docs/math.md §8).

:class:`SharedPrefixBatch` lays out every prompt once, followed by its completions, as a ``[1, T]`` batch
for a model whose attention runs :func:`rlloss.shared_prefix_attention` (see
``rlloss.integrations.transformers``), and gathers from the model's output, for every completion token, the
hidden state that predicts it — so the lm_head (and the loss) never runs on prompt positions.
:meth:`SharedPrefixBatch.pack_tree` packs any rollout tree (multi-turn and agentic rollouts) the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _checks
from .prefix_attention import SharedPrefixLayout

__all__ = ["SharedPrefixBatch"]

# SharedPrefixBatch.packing_pays's default: below this token ratio the packed run was no faster on CPU.
PACKING_MIN_TOKEN_RATIO = 1.25


def _token_ids(name: str, x: object) -> Tensor:
    _checks.instance(name, x, Tensor, "a 1-D torch.Tensor of token ids")
    if x.ndim != 1:
        raise ValueError(f"{name} must be a 1-D tensor of token ids, got shape {tuple(x.shape)}")
    if x.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype int64, got {_checks.dtype_name(x.dtype)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty; every prompt and completion needs at least one token")
    return x


def _no_negative_ids(names: Sequence[str], pieces: Sequence[Tensor], joined: Tensor) -> None:
    """Raise naming the first id tensor that holds a negative id (-100 and the like are padding, not tokens):
    one host sync for ``joined`` (the pieces concatenated); the culprit is looked for only on error."""
    if not bool((joined < 0).any()):
        return
    for name, x in zip(names, pieces):
        _checks.token_ids(name, x)


def _sequence(name: str, x: object) -> Sequence:
    if isinstance(x, Tensor) or not isinstance(x, (list, tuple)):
        raise TypeError(f"{name} must be a list of 1-D tensors, got {type(x).__name__}")
    return x


def _same_device(pieces: Sequence[Tensor], what: str) -> None:
    devices = {x.device for x in pieces}
    if len(devices) > 1:
        raise ValueError(f"all {what} must be on one device, got {sorted(str(d) for d in devices)}")


@dataclass(frozen=True, eq=False)
class SharedPrefixBatch:
    """Groups ``[prompt_g | c_g1 | … | c_gG]`` packed one after another into one stream of T tokens.

    Build with :meth:`pack` or :meth:`pack_tree`. Fields, all on one device, each explained in
    docs/api/shared_prefix_batch.md: ``input_ids``, ``position_ids`` ``[1, T]`` int64 (each completion's
    positions restart at its prompt's length); ``layout``, the :class:`~rlloss.SharedPrefixLayout`;
    ``predictor_index`` (the stream row whose hidden state predicts completion c's token j), ``token_index``
    (the row of the token), ``targets`` (``-100`` on padding) ``[C, S_max]`` int64, index entries on padding 0;
    ``mask`` ``[C, S_max]`` bool; ``prompt_lengths``, ``completion_lengths``, ``scored_segments`` (the layout
    segment of each row); ``attention_mask``, None (``[C, L]`` for ``pack(..., packed=False)``). C counts the
    completions (pack_tree: the scored segments) in stream order, S_max is the longest.
    """

    input_ids: Tensor
    position_ids: Tensor
    layout: Optional[SharedPrefixLayout]
    prompt_lengths: Tuple[int, ...]
    completion_lengths: Tuple[Tuple[int, ...], ...]
    predictor_index: Tensor
    token_index: Tensor
    targets: Tensor
    mask: Tensor
    _plan: "_GatherPlan" = field(repr=False)
    scored_segments: Tuple[int, ...] = ()
    attention_mask: Optional[Tensor] = None

    # --- construction ---------------------------------------------------------------------------------

    @classmethod
    def pack(cls, prompt_ids: Sequence[Tensor], completion_ids: Sequence[Sequence[Tensor]], *,
             device=None, packed: Union[bool, str] = True) -> "SharedPrefixBatch":
        """Pack prompts and their completions.

        Args:
            prompt_ids: one 1-D int64 tensor of token ids (≥ 0) per prompt (no padding), each non-empty.
            completion_ids: per prompt, a non-empty list of 1-D int64 tensors, one per completion (no
                padding), each non-empty.
            device: where the packed tensors live; default the inputs' device.
            packed: True: the shared-prefix stream. False: the ordinary padded batch ``[C, L]``, one
                ``[prompt | completion]`` per row, L = P_max + S_max, with ``attention_mask`` and no layout,
                the same fields and methods (docs/api/shared_prefix_batch.md, "The padded batch"). "auto":
                packed when :meth:`packing_pays`.

        Raises:
            TypeError: a container is not a list/tuple, an id tensor is not a tensor or not int64.
            ValueError: a prompt without completions, an empty or non-1-D id tensor, a negative id, mismatched
                list lengths, id tensors on different devices, an unknown device string, ``packed`` other than
                True, False or "auto".
        """
        if packed not in (True, False, "auto") or not isinstance(packed, (bool, str)):
            raise ValueError(f"packed must be True, False or 'auto', got {packed!r}")
        prompts = _sequence("prompt_ids", prompt_ids)
        groups = _sequence("completion_ids", completion_ids)
        if len(prompts) == 0:
            raise ValueError("prompt_ids is empty; pack needs at least one prompt")
        if len(groups) != len(prompts):
            raise ValueError(f"completion_ids must hold one list per prompt: {len(prompts)} prompts, got "
                             f"{len(groups)} lists")
        pieces: List[Tensor] = []
        names: List[str] = []
        prompt_lengths, completion_lengths, parents = [], [], []
        for g, (prompt, completions) in enumerate(zip(prompts, groups)):
            names.append(f"prompt_ids[{g}]")
            pieces.append(_token_ids(names[-1], prompt))
            completions = _sequence(f"completion_ids[{g}]", completions)
            if len(completions) == 0:
                raise ValueError(f"completion_ids[{g}] is empty; every prompt needs at least one completion")
            names += [f"completion_ids[{g}][{i}]" for i in range(len(completions))]
            pieces += [_token_ids(name, c) for name, c in zip(names[-len(completions):], completions)]
            prompt_lengths.append(prompt.numel())
            completion_lengths.append(tuple(c.numel() for c in completions))
            parents += [-1] + [len(parents)] * len(completions)
        _same_device(pieces, "prompt and completion ids")
        if packed == "auto":
            packed = cls.packing_pays(prompt_lengths, completion_lengths)
        if not packed:
            return cls._build_unpacked(pieces, names, prompt_lengths, completion_lengths, device)
        return cls._build(pieces, names, parents, [s for s, p in enumerate(parents) if p != -1], device)

    @staticmethod
    def packing_pays(prompt_lengths: Sequence[int], completion_lengths: Sequence[Sequence[int]], *,
                     min_token_ratio: float = PACKING_MIN_TOKEN_RATIO) -> bool:
        """Whether the packed stream is worth it: the padded batch ``[C, P_max + S_max]`` holds at least
        ``min_token_ratio`` times the tokens of the packed stream ``Σ_g (P_g + Σ_i S_gi)``; the lengths as in
        :meth:`SharedPrefixLayout.from_groups`. That ratio is the ideal speed-up of every token-wise layer; the
        default 1.25 was measured (docs/api/shared_prefix_batch.md, "When packing pays")."""
        prompts = SharedPrefixLayout._ints("prompt_lengths", prompt_lengths, minimum=1, why="≥ 1 token")
        if not _checks.is_list(completion_lengths) or len(completion_lengths) != len(prompts) or not prompts:
            raise ValueError("completion_lengths must hold one list of lengths per prompt (and there must be at "
                             "least one prompt)")
        groups = [SharedPrefixLayout._ints(f"completion_lengths[{g}]", c, minimum=1, why="≥ 1 token")
                  for g, c in enumerate(completion_lengths)]
        if not all(groups):
            raise ValueError("every prompt needs at least one completion")
        packed = sum(prompts) + sum(sum(c) for c in groups)
        padded = sum(len(c) for c in groups) * (max(prompts) + max(max(c) for c in groups))
        return padded >= min_token_ratio * packed

    @classmethod
    def _build_unpacked(cls, pieces: List[Tensor], names: List[str], prompt_lengths: List[int],
                        completion_lengths: List[Tuple[int, ...]], device) -> "SharedPrefixBatch":
        """The padded batch: row c = [0-padding | prompt | completion c | 0-padding], L = P_max + S_max."""
        _no_negative_ids(names, pieces, torch.cat(pieces))
        P_max = max(prompt_lengths)
        S_max = max(max(c) for c in completion_lengths)
        L = P_max + S_max
        rows, masks, k = [], [], 0
        for P, lengths in zip(prompt_lengths, completion_lengths):
            prompt, k = pieces[k], k + 1
            for S in lengths:
                completion, k = pieces[k], k + 1
                rows.append(torch.cat([prompt.new_zeros(P_max - P), prompt, completion, prompt.new_zeros(S_max - S)]))
                masks.append((torch.arange(L) >= P_max - P) & (torch.arange(L) < P_max + S))
        input_ids = torch.stack(rows).to(pieces[0].device if device is None else _checks.device(device))
        device = input_ids.device
        attention_mask = torch.stack(masks).long()
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        C = len(rows)
        lengths = torch.tensor([S for c in completion_lengths for S in c], dtype=torch.int64)
        j = torch.arange(S_max, dtype=torch.int64)
        mask = j < lengths[:, None]
        token = (torch.arange(C, dtype=torch.int64)[:, None] * L + P_max + j).masked_fill(~mask, 0)
        predictor = (token - 1).masked_fill(~mask, 0)
        valid = mask.flatten()
        empty = torch.zeros(0, dtype=torch.int64)
        plan = _GatherPlan(predictor=predictor.flatten(), padding=~valid,
                           inner_slots=torch.arange(valid.numel(), dtype=torch.int64)[valid],
                           inner_rows=predictor.flatten()[valid], first_slots=empty, group_slots=empty,
                           parent_last=empty, max_group=1)
        targets = input_ids.flatten().index_select(0, token.flatten().to(device)).view(token.shape)
        targets = targets.masked_fill(~mask.to(device), _checks.IGNORE_INDEX)
        return cls(input_ids=input_ids, position_ids=position_ids.to(device), layout=None,
                   prompt_lengths=tuple(prompt_lengths), completion_lengths=tuple(completion_lengths),
                   predictor_index=predictor.to(device), token_index=token.to(device), targets=targets,
                   mask=mask.to(device), _plan=plan.to(device), attention_mask=attention_mask.to(device))

    @classmethod
    def pack_tree(cls, segment_ids: Sequence[Tensor], parents: Sequence[int], scored: Optional[Sequence[bool]] = None,
                  *, device=None) -> "SharedPrefixBatch":
        """Pack rollout trees (multi-turn and agentic rollouts): segments with parent links, some scored.

        A root-to-leaf chain of segments is one rollout, each token attending to exactly the tokens before it
        in that sequence. A scored segment several rollouts share has one row, counted once by the loss (see
        :meth:`path_rows`; docs/api/shared_prefix_batch.md, "Rollout trees").

        Args:
            segment_ids: one 1-D int64 tensor of token ids (≥ 0) per segment, in stream order, each non-empty.
            parents: per segment, -1 (a root) or the index of an earlier segment.
            scored: per segment, whether its tokens are scored; default every non-root segment. A root cannot
                be scored (nothing predicts its first token); at least one segment must be.
            device: where the packed tensors live; default the inputs' device.

        Returns the fields of :meth:`pack`, one row per scored segment (in stream order, ``scored_segments``),
        ``prompt_lengths`` the root lengths and ``completion_lengths`` per tree its scored segments' lengths.

        Raises:
            TypeError: a container is not a list/tuple, an id tensor is not an int64 tensor, a parent is not an
                int, a ``scored`` entry is not a bool.
            ValueError: no segments, mismatched list lengths, an empty or non-1-D id tensor, a negative id, a
                parent that is not an earlier segment, a tree whose segments are not contiguous, a scored root,
                nothing scored, ids on different devices.
        """
        pieces = _sequence("segment_ids", segment_ids)
        if len(pieces) == 0:
            raise ValueError("segment_ids is empty; pack_tree needs at least one segment")
        names = [f"segment_ids[{i}]" for i in range(len(pieces))]
        pieces = [_token_ids(name, x) for name, x in zip(names, pieces)]
        parents = SharedPrefixLayout._ints("parents", parents)
        if len(parents) != len(pieces):
            raise ValueError(f"parents must hold one entry per segment: {len(pieces)} segments, got {len(parents)}")
        if scored is None:
            scored = [p != -1 for p in parents]
        elif not _checks.is_list(scored):
            raise TypeError(f"scored must be a list of bools, got {type(scored).__name__}")
        elif len(scored) != len(pieces):
            raise ValueError(f"scored must hold one entry per segment: {len(pieces)} segments, got {len(scored)}")
        for i, flag in enumerate(scored):
            if _checks.boolean(f"scored[{i}]", flag) and parents[i] == -1:
                raise ValueError(f"scored[{i}] is True but segment {i} is a root (parents[{i}] = -1): nothing "
                                 "predicts its first token; put the context it follows in a parent segment")
        if not any(scored):
            raise ValueError("no segment is scored (scored is all False); pack_tree needs at least one")
        SharedPrefixLayout._check_parents(parents)
        tree = []  # each tree's segments must be contiguous, so its rows are too (group_sizes, unpack)
        for i, p in enumerate(parents):
            tree.append(i if p == -1 else tree[p])
            if i and tree[i] < tree[i - 1]:
                raise ValueError(f"segment {i} belongs to the tree of segment {tree[i]} but follows segment {i - 1} "
                                 f"of the later tree of segment {tree[i - 1]}: store each tree's segments "
                                 "contiguously (e.g. depth-first)")
        _same_device(pieces, "segment ids")
        return cls._build(pieces, names, parents, [s for s, flag in enumerate(scored) if flag], device)

    @classmethod
    def _build(cls, pieces: List[Tensor], names: List[str], parents: Sequence[int], rows: List[Optional[int]],
               device, width: Optional[int] = None) -> "SharedPrefixBatch":
        """The one packer behind :meth:`pack`, :meth:`pack_tree` and ``build_teacher_inputs(packed=True)``: the
        stream of the segments ``pieces`` (``names`` for errors; parents as in
        :meth:`SharedPrefixLayout.from_tree`), with one row per entry of ``rows`` (a segment, or None for a row
        of padding only), ``width`` wide (default the longest)."""
        lengths = [x.numel() for x in pieces]
        input_ids = torch.cat(pieces).to(pieces[0].device if device is None else _checks.device(device))
        _no_negative_ids(names, pieces, input_ids)
        device = input_ids.device  # "cuda" resolved to "cuda:0": the layout's device must equal q's exactly
        layout = SharedPrefixLayout.from_tree(lengths, parents, device=device)
        roots = [s for s in range(len(lengths)) if parents[s] == -1]
        root_of = []
        for s, p in enumerate(parents):
            root_of.append(s if p == -1 else root_of[p])
        predictor, token, mask, plan = _gather_tables(layout, rows, width)
        predictor, token, mask, plan = predictor.to(device), token.to(device), mask.to(device), plan.to(device)
        targets = input_ids.index_select(0, token.flatten()).view(token.shape).masked_fill(~mask, _checks.IGNORE_INDEX)
        return cls(input_ids=input_ids[None], position_ids=layout.position_ids()[None], layout=layout,
                   prompt_lengths=tuple(lengths[r] for r in roots),
                   completion_lengths=tuple(tuple(lengths[s] for s in rows if s is not None and root_of[s] == r)
                                            for r in roots),
                   predictor_index=predictor, token_index=token, targets=targets, mask=mask, _plan=plan,
                   scored_segments=tuple(rows))

    def to(self, device) -> "SharedPrefixBatch":
        """The same batch with every tensor (and the layout) on ``device``."""
        device = self.input_ids.to(device).device  # "cuda" resolved to "cuda:0", as the layout wants
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{name: x.to(device) for name, x in values.items()
                                if isinstance(x, (Tensor, SharedPrefixLayout, _GatherPlan))})

    # --- sizes ----------------------------------------------------------------------------------------

    @property
    def packed(self) -> bool:
        """True for the shared-prefix stream, False for the padded batch of ``pack(..., packed=False)``."""
        return self.layout is not None

    @property
    def total_tokens(self) -> int:
        """T, the length of the packed stream (C·L for the padded batch)."""
        return self.input_ids.numel()

    @property
    def num_completions(self) -> int:
        """C, the number of completions of all groups together."""
        return self.mask.shape[0]

    @property
    def group_sizes(self) -> Tuple[int, ...]:
        """Completions per prompt: the ``group_sizes`` of :func:`rlloss.group_advantages`."""
        return tuple(len(lengths) for lengths in self.completion_lengths)

    @property
    def num_completion_tokens(self) -> int:
        """Σ S_c, e.g. the ``num_items_in_batch`` of a token-mean loss over this batch alone."""
        return sum(sum(lengths) for lengths in self.completion_lengths)

    def paths(self) -> List[Tuple[int, ...]]:
        """Every root-to-leaf chain of segments (one rollout each), leaves in stream order."""
        if self.layout is None:
            raise ValueError("the padded batch (packed=False) has no segments; paths() is for packed batches")
        parents = self.layout.parents
        has_child = set(p for p in parents if p != -1)
        return [tuple(self.layout.ancestors(s)) + (s,) for s in range(len(parents)) if s not in has_child]

    def path_rows(self) -> List[Tuple[int, ...]]:
        """For every path of :meth:`paths`, the rows (indices into C) of its scored segments, root first.

        A row shared by several paths (a turn before a branch point) is listed in each: e.g. the number of
        rollouts through row c is ``sum(c in rows for rows in batch.path_rows())``, a weight that makes the
        packed loss count it once per rollout, as separate runs do."""
        row_of = {s: c for c, s in enumerate(self.scored_segments)}
        return [tuple(row_of[s] for s in path if s in row_of) for path in self.paths()]

    # --- model inputs and outputs ---------------------------------------------------------------------

    def model_inputs(self) -> Dict[str, object]:
        """Keyword arguments of a model call with shared-prefix attention enabled:
        ``model(**batch.model_inputs())`` passes ``input_ids``, ``position_ids`` and ``shared_prefix`` (the
        padded batch: ``attention_mask`` instead of ``shared_prefix``)."""
        if self.layout is None:
            return {"input_ids": self.input_ids, "position_ids": self.position_ids,
                    "attention_mask": self.attention_mask}
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "shared_prefix": self.layout}

    def gather_hidden(self, hidden: Tensor) -> Tensor:
        """For every completion token, the row of ``hidden`` that predicts it.

        Args:
            hidden: ``[1, T, ...]`` or ``[T, ...]`` per-position outputs of the packed run (final hidden states,
                or anything else laid out along the stream, e.g. logits); ``[C, L, ...]`` for the padded batch.

        Returns:
            ``[C, S_max, ...]``: row ``[c, j]`` is the stream row ``predictor_index[c, j]``; padding rows (where
            ``mask`` is False) are 0 and pass no gradient. Differentiable, with a deterministic backward (a
            fixed-order sum over each prompt's completions, no atomics).
        """
        padded = self.layout is None and isinstance(hidden, Tensor) and hidden.ndim >= 2
        if padded and tuple(hidden.shape[:2]) == tuple(self.input_ids.shape):
            hidden = hidden.flatten(0, 1)  # the padded batch: rows of [C·L]
        return gather_predictors(hidden, self._plan, tuple(self.predictor_index.shape), self.total_tokens,
                                 hint="batch.to(device)")

    def unpack(self, values: Tensor) -> List[List[Tensor]]:
        """Split per-completion results ``[C, S_max, ...]`` (e.g. per-token log-probs of the gathered hidden
        states) into one list per prompt (per tree for :meth:`pack_tree`: its scored segments) of ``[S_c, ...]``
        views, padding dropped."""
        values = _checks.tensor("values", values)
        _checks.leading("values", values, self.mask.shape, "[C, S_max, ...]")
        out, c = [], 0
        for lengths in self.completion_lengths:
            out.append([values[c + i, :n] for i, n in enumerate(lengths)])
            c += len(lengths)
        return out


def gather_predictors(hidden: Tensor, plan: "_GatherPlan", shape: Tuple[int, ...], total_tokens: int, *,
                      hint: str) -> Tensor:
    """``hidden`` [1, T, ...] or [T, ...] of a packed stream → [*shape, ...], the rows ``plan`` names (see
    :meth:`SharedPrefixBatch.gather_hidden`); ``hint`` says how to move the index tables to another device."""
    hidden = _checks.tensor("hidden", hidden)
    T = total_tokens
    if hidden.ndim >= 2 and hidden.shape[0] == 1 and hidden.shape[1] == T:
        hidden = hidden[0]
    elif hidden.ndim < 1 or hidden.shape[0] != T:
        raise ValueError(f"hidden must be [1, T, ...] or [T, ...] with T = {T} packed tokens, got shape "
                         f"{tuple(hidden.shape)}")
    if hidden.device != plan.predictor.device:
        raise ValueError(f"hidden is on {hidden.device}, the index tables on {plan.predictor.device}; move one of "
                         f"them ({hint})")
    rows = _GatherPredictors.apply(hidden, plan)
    return rows.view(*shape, *hidden.shape[1:])


class _GatherPlan(NamedTuple):
    """Index tensors of :func:`SharedPrefixBatch.gather_hidden`, over the flattened ``[C·S_max]`` slots."""

    predictor: Tensor    # [C·S_max] stream row of every slot (0 on padding)
    padding: Tensor      # [C·S_max] bool, True on padding slots
    inner_slots: Tensor  # slots of tokens j ≥ 1: each reads its own stream row, no row read twice ...
    inner_rows: Tensor   # ... namely these rows (rows of the scored segments)
    first_slots: Tensor  # [C'] slot of each non-empty row's first token (j = 0)
    group_slots: Tensor  # [C'] place of each such row in a [num_parents · G_max] grid: parent·G_max + rank
    parent_last: Tensor  # [num_parents] the stream row of each parent's last token (a prompt's, two levels)
    max_group: int       # G_max, the most rows under one parent

    def to(self, device) -> "_GatherPlan":
        return _GatherPlan(*(x.to(device) if isinstance(x, Tensor) else x for x in self))


class _GatherPredictors(torch.autograd.Function):
    """``hidden[predictor]`` with zeros on padding; a deterministic backward (see ``gather_hidden``)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, plan: _GatherPlan) -> Tensor:
        ctx.plan, ctx.rows = plan, hidden.shape[0]
        rows = hidden.index_select(0, plan.predictor)
        return rows.masked_fill_(plan.padding.view(-1, *([1] * (hidden.ndim - 1))), 0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        plan = ctx.plan
        grad_hidden = grad.new_zeros(ctx.rows, *grad.shape[1:])
        grad_hidden.index_copy_(0, plan.inner_rows, grad.index_select(0, plan.inner_slots))
        num_parents = plan.parent_last.numel()
        first = grad.new_zeros(num_parents * plan.max_group, *grad.shape[1:])
        first.index_copy_(0, plan.group_slots, grad.index_select(0, plan.first_slots))
        per_parent = first.view(num_parents, plan.max_group, *grad.shape[1:]).sum(1)
        grad_hidden.index_copy_(0, plan.parent_last, per_parent)
        return grad_hidden, None


def _gather_tables(layout: SharedPrefixLayout, segments: Sequence[Optional[int]],
                   width: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor, _GatherPlan]:
    """(predictor_index, token_index, mask, plan), the first three [C, width], built on the host.

    One row per scored segment of ``segments`` (``None`` gives a row of padding only). Token j ≥ 1 of segment s is
    predicted by its row j − 1, token 0 by the last row of s's parent; ``width`` defaults to the longest.
    Each scored segment appears once, so every stream row is read by at most one slot, except a parent's last
    row (which its own segment's tokens never read, scored or not), which the backward sums over its children.
    """
    C = len(segments)
    starts = torch.tensor([layout.starts[s] if s is not None else 0 for s in segments], dtype=torch.int64)
    lengths = torch.tensor([layout.lengths[s] if s is not None else 0 for s in segments], dtype=torch.int64)
    parent_index: Dict[int, int] = {}  # parent segment → its place in parent_last, in order of first use
    row_parent, group_slots, first_rows, counts = [], [], [], []
    for c, s in enumerate(segments):
        if s is None:
            row_parent.append(0)
            continue
        p = layout.parents[s]
        if p == -1:
            raise ValueError(f"segment {s} is a root: its first token has no predictor")
        if p not in parent_index:
            parent_index[p] = len(parent_index)
            counts.append(0)
        row_parent.append(layout.starts[p] + layout.lengths[p] - 1)
        first_rows.append(c)
        group_slots.append((parent_index[p], counts[parent_index[p]]))
        counts[parent_index[p]] += 1
    S_max = int(lengths.max()) if C else 0
    width = S_max if width is None else width
    j = torch.arange(width, dtype=torch.int64)
    mask = j < lengths[:, None]
    token = starts[:, None] + j
    predictor = torch.where(j == 0, torch.tensor(row_parent, dtype=torch.int64)[:, None], token - 1)
    predictor = predictor.masked_fill(~mask, 0)

    inner = (mask & (j >= 1)).flatten()
    slots = torch.arange(mask.numel(), dtype=torch.int64)
    max_group = max(counts, default=1)
    plan = _GatherPlan(
        predictor=predictor.flatten(), padding=~mask.flatten(), inner_slots=slots[inner],
        inner_rows=predictor.flatten()[inner],
        first_slots=torch.tensor(first_rows, dtype=torch.int64) * width,
        group_slots=torch.tensor([g * max_group + r for g, r in group_slots], dtype=torch.int64),
        parent_last=torch.tensor([layout.starts[p] + layout.lengths[p] - 1 for p in parent_index], dtype=torch.int64),
        max_group=max_group)
    return predictor, token.masked_fill(~mask, 0), mask, plan
