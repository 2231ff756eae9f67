"""Teacher contexts for contrastive-teacher credit (docs/math.md §7, §8).

:func:`build_teacher_inputs` lays out the two teacher contexts ``[prompt | prefix | r± | suffix | completion]``
of every rollout as a right-padded batch for one causal-LM forward (:class:`TeacherInputs`) or, with
``packed=True``, as one shared-prefix stream holding each group's prompt and answers once
(:class:`PackedTeacherInputs`, built by the one shared-prefix packer of :mod:`rlloss.prefix_batch`); both give
the same rows and the same :meth:`~TeacherInputs.split`, whose (ℓ⁺, ℓ⁻) pair feeds :func:`rlloss.contrastive_credit`
or ``LossConfig(credit=...)``.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _checks
from ._compat import renamed_keywords
from .credit import check_credit_mode
from .prefix_attention import SharedPrefixLayout
from .prefix_batch import SharedPrefixBatch, _GatherPlan, gather_predictors

__all__ = ["PackedTeacherInputs", "TeacherInputs", "build_teacher_inputs"]

FALLBACKS = ("grpo", "rlsd")


@dataclass(frozen=True, eq=False)
class _TeacherRows:
    """What both teacher layouts share: R teacher rows (positive rows of the non-skipped rollouts in batch
    order, then their negative rows), each scoring one rollout's completion against ``targets`` [R, T]."""

    targets: Tensor
    rollout: Tensor
    positive: Tensor
    skipped: Tensor
    rlsd: Tensor
    negative_source: Tensor

    @property
    def num_rows(self) -> int:
        """R, the number of teacher contexts (0 when every rollout was skipped: no forward needed)."""
        return self.targets.shape[0]

    def split(self, logprobs: Tensor, *, base_logprobs: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(pos_logprobs, neg_logprobs), each [B, T] in the policy batch's row order, from the teacher
        log-probs [R, T] of every row (``token_logprobs(teacher.gather_hidden(h), W, teacher.targets)``).

        Skipped rollouts get 0 in both (Δ = 0). RLSD rollouts get ``base_logprobs`` ([B, T]: the old
        log-probs, or the policy's own computed under no_grad) as their ℓ⁻, so Δ = ℓ⁺ − ℓ° for them; it is
        required when any rollout is RLSD. Feed the pair to ``LossConfig(credit="cepo")`` or
        :func:`contrastive_credit` with ``credit="cepo"``.
        """
        logprobs = _checks.tensor("logprobs", logprobs)
        R, T = self.targets.shape
        B = self.skipped.shape[0]
        _checks.shape("logprobs", logprobs, (R, T), "[R, T]", " (one row per teacher context)")
        device = logprobs.device
        rollout, positive = self.rollout.to(device), self.positive.to(device)
        pos = torch.zeros((B, T), dtype=logprobs.dtype, device=device)
        neg = torch.zeros((B, T), dtype=logprobs.dtype, device=device)
        pos[rollout[positive]] = logprobs[positive]
        neg[rollout[~positive]] = logprobs[~positive]
        if bool(self.rlsd.any()):
            if base_logprobs is None:
                rows = self.rlsd.nonzero().flatten().tolist()
                raise ValueError(f"rollouts {rows[:8]} use RLSD (no wrong answer in their group, or credit='rlsd'): "
                                 "pass base_logprobs=[B, T] policy log-probs for their ℓ⁻")
            base_logprobs = _checks.tensor("base_logprobs", base_logprobs)
            _checks.shape("base_logprobs", base_logprobs, (B, T), "[B, T]")
            rlsd = self.rlsd.to(device)
            neg[rlsd] = base_logprobs.detach().to(device=device, dtype=logprobs.dtype)[rlsd]
        return pos, neg


@dataclass(frozen=True)
class TeacherInputs(_TeacherRows):
    """The teacher contexts of a batch of rollouts, ready for one causal-LM forward (see
    :func:`build_teacher_inputs`). R teacher rows, contexts right-padded to L, completions padded to T.

    input_ids, attention_mask, position_ids: [R, L] int64, as a Hugging Face causal LM takes them
        (``model(**teacher.model_inputs())``); position ids count 0, 1, … along each row.
    logprob_positions: [R, T] int64, the position whose output predicts completion token j (0 past the end).
    targets: [R, T] int64, completion token j, ``ignore_index`` past each completion's end.
    rollout: [R] int64, the rollout (row of the policy batch) a teacher row belongs to.
    positive: [R] bool, True for a [prompt | r⁺ | completion] row, False for [prompt | r⁻ | completion].
    skipped: [B] bool, rollouts with no teacher row (zero advantage, or no wrong answer with
        ``fallback="grpo"``): Δ = 0 for them, i.e. plain GRPO.
    rlsd: [B] bool, rollouts with a positive row only (``credit="rlsd"``, or ``fallback="rlsd"`` in a group
        without a wrong answer): their ℓ⁻ is the base (policy) log-prob, see :meth:`split`.
    negative_source: [G] int64, per group the rollout whose answer is r⁻, or −1 when there is none.
    ignore_index: the filler of ``targets``.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    logprob_positions: Tensor
    ignore_index: int = -100

    def model_inputs(self) -> Dict[str, Tensor]:
        """``input_ids``, ``attention_mask`` and ``position_ids`` as keyword arguments of a causal LM."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}

    def gather_hidden(self, hidden: Tensor) -> Tensor:
        """[R, L, D] final hidden states → [R, T, D], the rows that predict each completion token; pass them
        with :attr:`targets` to :func:`rlloss.token_logprobs`."""
        hidden = _checks.tensor("hidden", hidden)
        R, L = self.input_ids.shape
        _checks.ndim("hidden", hidden, 3, "[R, L, D]")
        _checks.leading("hidden", hidden, (R, L), "[R, L, D]")
        index = self.logprob_positions.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[2])
        return hidden.gather(1, index)


@dataclass(frozen=True, eq=False)
class PackedTeacherInputs(_TeacherRows):
    """The teacher contexts of a batch of rollouts packed into one shared-prefix stream (see
    :func:`build_teacher_inputs` with ``packed=True``): per group one prompt segment, its answer segments r⁺
    and r⁻ as children, and every rollout's completion under each answer it is scored with, so a group's
    prompt and answers are encoded once for its 2·G teacher contexts (docs/math.md §8).

    input_ids, position_ids: [1, N] int64, the stream; a token's position is its place in its own
        ``[prompt | prefix | r± | suffix | completion]`` context, as in :class:`TeacherInputs`.
    layout: the :class:`~rlloss.SharedPrefixLayout` of the stream (None when there are no rows).
    row_segments: R ints, the layout segment holding each row's completion (−1 for an empty completion).
    logprob_positions: [R, T] int64, the stream position whose output predicts completion token j — the last
        token of the row's answer segment for j = 0, token j − 1 of the completion otherwise (0 past the end).
    targets, rollout, positive, skipped, rlsd, negative_source, ignore_index: as in :class:`TeacherInputs`
        (the same rows in the same order, so :meth:`split` gives the same pair).
    unpacked_tokens: Σ of the R contexts' lengths, the tokens :class:`TeacherInputs` runs (without padding);
        ``total_tokens / unpacked_tokens`` is the token count the packing keeps.
    """

    input_ids: Tensor
    position_ids: Tensor
    layout: Optional[SharedPrefixLayout]
    row_segments: Tuple[int, ...]
    logprob_positions: Tensor
    unpacked_tokens: int
    ignore_index: int = -100
    _plan: Optional[_GatherPlan] = field(default=None, repr=False)

    @property
    def total_tokens(self) -> int:
        """N, the length of the packed stream (0 when there are no rows)."""
        return self.input_ids.shape[1]

    def _nonempty(self, what: str) -> None:
        if self.layout is None:
            raise ValueError(f"no teacher rows (every rollout was skipped): there is no stream to {what}; call "
                             "split on a [0, T] tensor")

    def model_inputs(self) -> Dict[str, object]:
        """``input_ids``, ``position_ids`` and ``shared_prefix`` (the layout) as keyword arguments of a model
        with shared-prefix attention enabled (``rlloss.integrations.transformers.enable_shared_prefix``)."""
        self._nonempty("run")
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "shared_prefix": self.layout}

    def gather_hidden(self, hidden: Tensor) -> Tensor:
        """[1, N, D] (or [N, D]) final hidden states of the packed stream → [R, T, D], the rows that predict
        each completion token (0 past each completion's end); pass them with :attr:`targets` to
        :func:`rlloss.token_logprobs`. Differentiable, with the deterministic backward of
        :meth:`rlloss.SharedPrefixBatch.gather_hidden` (an answer's last row sums over its completions)."""
        self._nonempty("gather from")
        return gather_predictors(hidden, self._plan, tuple(self.targets.shape), self.total_tokens,
                                 hint="build_teacher_inputs(..., device=...)")


def _token_list(name: str, values: object, length: int, *, optional: bool = False) -> List[Optional[Tensor]]:
    """A list of ``length`` 1-D int64 tensors (None entries allowed when ``optional``)."""
    if not _checks.is_list(values):
        raise TypeError(f"{name} must be a list of 1-D int64 tensors, got {type(values).__name__}")
    if len(values) != length:
        raise ValueError(f"{name} must have {length} entries, got {len(values)}")
    return [None if x is None and optional else _ids(f"{name}[{k}]", x, " or None" if optional else "")
            for k, x in enumerate(values)]


def _ids(name: str, x: object, alternative: str = "") -> Tensor:
    """The host copy of a 1-D int64 tensor of token ids, each >= 0 (they index an embedding)."""
    _checks.instance(name, x, Tensor, f"a 1-D int64 tensor{alternative}")
    if x.dtype != torch.int64 or x.ndim != 1:
        raise TypeError(f"{name} must be a 1-D int64 tensor, got {_checks.dtype_name(x.dtype)} of shape "
                        f"{tuple(x.shape)}")
    x = x.detach().cpu()
    _checks.token_ids(name, x)
    return x


@renamed_keywords(mode="credit")
def build_teacher_inputs(
    prompt_ids: Sequence[Tensor],
    completion_ids: Sequence[Tensor],
    rewards: Union[Tensor, Sequence[float]],
    group_sizes: Sequence[int],
    answer_ids: Sequence[Tensor],
    wrong_answer_ids: Optional[Sequence[Optional[Tensor]]],
    *,
    advantages: Optional[Tensor] = None,
    credit: str = "cepo",
    fallback: str = "grpo",
    reject_below: float = 0.5,
    answer_prefix_ids: Optional[Tensor] = None,
    answer_suffix_ids: Optional[Tensor] = None,
    completion_length: Optional[int] = None,
    pad_token_id: int = 0,
    ignore_index: int = -100,
    device: Union[str, torch.device, None] = None,
    packed: bool = False,
) -> Union[TeacherInputs, PackedTeacherInputs]:
    """The teacher contexts ``[prompt | prefix | r± | suffix | completion]`` of every rollout, as one
    right-padded causal-LM batch — or, with ``packed=True``, as one shared-prefix stream holding each group's
    prompt and answers once — and where each completion token's teacher log-prob is read (docs/math.md §7, §8).

    Token level and tokenizer-agnostic: every argument is token ids. The B rollouts form consecutive groups
    (the completions of one prompt) of sizes ``group_sizes``.

    Args:
        prompt_ids: G 1-D int64 tensors, the prompt of each group (unpadded; the chat template applied).
        completion_ids: B 1-D int64 tensors, each rollout's completion exactly as its log-probs are scored
            (unpadded, EOS included if the loss counts it). Completion j of the batch is row j of the
            policy batch whose [B, T] log-probs the credit multiplies.
        rewards: [B] scores; a rollout is rejected when its score < ``reject_below``.
        group_sizes: G ints ≥ 1 summing to B.
        answer_ids: G non-empty 1-D int64 tensors, r⁺ of each group (e.g. the tokens of "42").
        wrong_answer_ids: B entries, the boxed answer extracted from each rollout as token ids, or None (or an
            empty tensor) when a rollout has no answer. Unused (may be None) with ``credit="rlsd"``.
        advantages: optional [B]; when given, rollouts with A = 0 get no teacher rows (their Â is 0 anyway).
            Without it a group is skipped when all its rewards are equal (A = 0 in every §2 mode).
        credit: "cepo" (a positive and a negative context per rollout) or "rlsd" (positive only), as
            ``LossConfig.credit``; the old keyword ``mode=`` works for one release, with a DeprecationWarning.
        fallback: for a "cepo" group without a usable wrong answer: "grpo" (r⁻ = r⁺, i.e. Δ = 0: no teacher
            rows) or "rlsd" (positive rows only, Δ = ℓ⁺ − ℓ°).
        reject_below: the score under which a rollout is rejected (docs/math.md §7: 0.5).
        answer_prefix_ids, answer_suffix_ids: optional 1-D int64 tokens placed around r± in both contexts
            (e.g. "The correct answer is \\boxed{" and "}.\\n"), so the two contexts differ in the answer only.
        completion_length: T of the outputs (≥ the longest completion; default the longest), to match the
            policy batch's padded length.
        pad_token_id: filler of ``input_ids`` past each context (masked out by ``attention_mask``); unused
            with ``packed=True``.
        ignore_index: filler of ``targets`` past each completion.
        device: where the tensors go (default: the device of ``completion_ids[0]``).
        packed: False for :class:`TeacherInputs` (right-padded rows, any causal LM); True for
            :class:`PackedTeacherInputs`, one ``[1, N]`` stream for a model with shared-prefix attention holding,
            per group that is not skipped, ``[prompt | prefix]`` once, ``[r± | suffix]`` once below it and each
            rollout's completion under each answer it is scored with (the tree: docs/api/credit.md).

    r⁻ of a group is the answer of its lowest-scoring rejected rollout that has one (score < reject_below,
    answer not None, not empty and not equal to r⁺); ties go to the first in batch order. It is shared by
    every rollout of the group.

    Returns:
        :class:`TeacherInputs` (or :class:`PackedTeacherInputs`): positive rows of the non-skipped rollouts in
        batch order, then their negative rows in batch order — the same rows, ``targets`` and
        :meth:`~TeacherInputs.split` in both layouts, so their log-probs are interchangeable.
    """
    _checks.boolean("packed", packed)
    mode = check_credit_mode(credit)
    _checks.choice("fallback", fallback, FALLBACKS)
    from .advantages import _check_group_sizes, _check_rewards

    if not isinstance(rewards, Tensor):
        if not _checks.is_list(rewards) or not all(_checks.is_number(r) for r in rewards):
            raise TypeError(f"rewards must be a [B] float tensor or a list of numbers, got {type(rewards).__name__}")
        rewards = torch.tensor(list(rewards), dtype=torch.float64)
    rewards = _check_rewards(rewards, True).detach().to("cpu", torch.float64)
    B = rewards.shape[0]
    sizes = [int(s) for s in _check_group_sizes(group_sizes, B, True).tolist()]
    G = len(sizes)
    prompts = _token_list("prompt_ids", prompt_ids, G)
    completions = _token_list("completion_ids", completion_ids, B)
    answers = _token_list("answer_ids", answer_ids, G)
    for g in range(G):
        if answers[g].numel() == 0:
            raise ValueError(f"answer_ids[{g}] must hold at least one token (r⁺), got an empty tensor")
    if mode == "cepo":
        if wrong_answer_ids is None:
            raise ValueError("credit='cepo' needs wrong_answer_ids (B entries, None where a rollout has no answer)")
        wrong = _token_list("wrong_answer_ids", wrong_answer_ids, B, optional=True)
    else:
        wrong = [None] * B
    if advantages is not None:
        advantages = _checks.tensor("advantages", advantages)
        _checks.shape("advantages", advantages, (B,), "[B]")
        advantages = advantages.detach().cpu()
    if not math.isfinite(_checks.number("reject_below", reject_below, "a finite number")):
        raise TypeError(f"reject_below must be a finite number, got {reject_below!r}")
    prefix, suffix = (torch.zeros(0, dtype=torch.int64) if x is None else _ids(name, x, " or None")
                      for name, x in (("answer_prefix_ids", answer_prefix_ids),
                                      ("answer_suffix_ids", answer_suffix_ids)))
    longest = max((c.numel() for c in completions), default=0)
    if completion_length is None:
        T = longest
    else:
        T = _checks.integer("completion_length", completion_length)
        if T < longest:
            raise ValueError(f"completion_length must be >= the longest completion ({longest}), got {T}")
    pad_token_id = _checks.integer("pad_token_id", pad_token_id)
    ignore_index = _checks.integer("ignore_index", ignore_index)
    device = _checks.device(device) if device is not None else completion_ids[0].device if B else torch.device("cpu")

    skipped = torch.zeros(B, dtype=torch.bool)
    rlsd = torch.zeros(B, dtype=torch.bool)
    negative_source = torch.full((G,), -1, dtype=torch.int64)
    negative_answer: List[Optional[Tensor]] = [None] * G
    group_of = [g for g, size in enumerate(sizes) for _ in range(size)]
    for g, (begin, size) in enumerate(zip(itertools.accumulate(sizes[:-1], initial=0), sizes)):
        span, members = slice(begin, begin + size), range(begin, begin + size)
        if advantages is not None:
            skipped[span] = advantages[span] == 0
        elif bool((rewards[span] == rewards[begin]).all()):
            skipped[span] = True
        if bool(skipped[span].all()):  # no teacher compute for this group at all
            continue
        if mode == "rlsd":
            rlsd[span] = ~skipped[span]
        else:
            candidates = [i for i in members if float(rewards[i]) < reject_below and wrong[i] is not None
                          and wrong[i].numel() > 0 and not torch.equal(wrong[i], answers[g])]
            if candidates:
                source = min(candidates, key=lambda i: (float(rewards[i]), i))
                negative_source[g] = source
                negative_answer[g] = wrong[source]
            elif fallback == "grpo":
                skipped[span] = True
            else:
                rlsd[span] = ~skipped[span]

    rows = ([(i, True, answers[group_of[i]]) for i in range(B) if not skipped[i]]  # (rollout, positive, answer)
            + [(i, False, negative_answer[group_of[i]]) for i in range(B) if not skipped[i] and not rlsd[i]])

    targets = torch.full((len(rows), T), ignore_index, dtype=torch.int64)
    for k, (i, _, _) in enumerate(rows):
        targets[k, : completions[i].numel()] = completions[i]
    common = {name: x.to(device) for name, x in dict(
        targets=targets, rollout=torch.tensor([i for i, _, _ in rows], dtype=torch.int64),
        positive=torch.tensor([p for _, p, _ in rows], dtype=torch.bool), skipped=skipped, rlsd=rlsd,
        negative_source=negative_source).items()}
    heads = [torch.cat([prompts[group_of[i]], prefix, answer, suffix]) for i, _, answer in rows]
    if packed:
        return _pack_teacher_rows(rows, heads, prompts, answers, negative_answer, prefix, suffix, completions,
                                  group_of, rlsd, T, ignore_index, device, common)

    contexts = [torch.cat([head, completions[i]]) for (i, _, _), head in zip(rows, heads)]
    R = len(rows)
    L = max((c.numel() for c in contexts), default=0)
    input_ids = torch.full((R, L), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((R, L), dtype=torch.int64)
    positions = torch.zeros((R, T), dtype=torch.int64)
    for k, ((i, _, _), context, head) in enumerate(zip(rows, contexts, heads)):
        input_ids[k, : context.numel()] = context
        attention_mask[k, : context.numel()] = 1
        # the output at p predicts token p + 1
        positions[k, : completions[i].numel()] = torch.arange(head.numel() - 1, context.numel() - 1)
    position_ids = torch.arange(L, dtype=torch.int64).expand(R, L).contiguous()
    return TeacherInputs(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         position_ids=position_ids.to(device), logprob_positions=positions.to(device),
                         ignore_index=ignore_index, **common)


def _pack_teacher_rows(rows, heads, prompts, answers, negative_answer, prefix, suffix, completions, group_of,
                       rlsd, T, ignore_index, device, common) -> PackedTeacherInputs:
    """The rows of :func:`build_teacher_inputs` as one shared-prefix stream (``packed=True``): their segment tree,
    packed as :meth:`SharedPrefixBatch.pack_tree` packs one, with the rows in the teacher's order."""
    parents: List[int] = []
    pieces: List[Tensor] = []

    def segment(tokens: Tensor, parent: int) -> int:
        parents.append(parent)
        pieces.append(tokens)
        return len(pieces) - 1

    completion_segment: Dict[Tuple[int, bool], int] = {}
    # The positive rows are the rollouts with rows, in batch order: each group's are consecutive.
    for g, members in itertools.groupby((i for i, positive, _ in rows if positive), key=group_of.__getitem__):
        members = list(members)
        head = torch.cat([prompts[g], prefix])
        root = segment(head, -1) if head.numel() else -1
        for positive in (True, False):
            scored = [i for i in members if positive or not rlsd[i]]
            if not scored:
                continue
            answer = answers[g] if positive else negative_answer[g]
            parent = segment(torch.cat([answer, suffix]), root)
            for i in scored:
                if completions[i].numel():
                    completion_segment[(i, positive)] = segment(completions[i], parent)
    row_segments = [completion_segment.get((i, positive), -1) for i, positive, _ in rows]
    unpacked = sum(head.numel() + completions[i].numel() for (i, _, _), head in zip(rows, heads))
    if not rows:
        empty = torch.zeros((1, 0), dtype=torch.int64, device=device)
        return PackedTeacherInputs(input_ids=empty, position_ids=empty, layout=None, row_segments=(),
                                   logprob_positions=torch.zeros((0, T), dtype=torch.int64, device=device),
                                   unpacked_tokens=0, ignore_index=ignore_index, **common)
    stream = SharedPrefixBatch._build(pieces, [f"segment {s}" for s in range(len(pieces))], parents,
                                      [s if s >= 0 else None for s in row_segments], device, width=T)
    return PackedTeacherInputs(
        input_ids=stream.input_ids, position_ids=stream.position_ids, layout=stream.layout,
        row_segments=tuple(row_segments), logprob_positions=stream.predictor_index, unpacked_tokens=unpacked,
        ignore_index=ignore_index, _plan=stream._plan, **common)
