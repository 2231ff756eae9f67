"""Packed teacher inputs (``build_teacher_inputs(..., packed=True)``, docs/math.md §7 + §8): each group's prompt and
answers held once in one shared-prefix stream. The layout, positions and gather indices exactly (by hand and
against the padded variant, row by row), the deep-tree gather and its gradient, and end to end on a tiny random
``LlamaForCausalLM``: the packed teacher log-probs, the credit and the fused loss equal the padded variant's."""
import pytest
import torch
from conftest import INTERPRETED, KERNEL_BACKEND
from hypothesis import given, settings
from hypothesis import strategies as st

import rlloss
from rlloss import FusedPolicyLoss, LossConfig, contrastive_credit
from rlloss.teacher import PackedTeacherInputs, TeacherInputs, build_teacher_inputs

ROW_FIELDS = ("targets", "rollout", "positive", "skipped", "rlsd", "negative_source")


def _ids(*values):
    return torch.tensor(values, dtype=torch.int64)


def _both(prompts, completions, rewards, sizes, *args, **kwargs):
    """(packed, padded) teacher inputs of the same batch, checked against each other."""
    padded = build_teacher_inputs(prompts, completions, rewards, sizes, *args, **kwargs)
    packed = build_teacher_inputs(prompts, completions, rewards, sizes, *args, **kwargs, packed=True)
    assert isinstance(padded, TeacherInputs) and isinstance(packed, PackedTeacherInputs)
    prefix = kwargs.get("answer_prefix_ids")
    heads = [p.numel() + (0 if prefix is None else prefix.numel()) for p in prompts]  # |prompt| + |prefix|
    _check_against_padded(packed, padded, [g for g, n in enumerate(sizes) for _ in range(n)], heads)
    return packed, padded


def _check_against_padded(packed, padded, group_of, heads):
    """Row k of the packed stream is row k of the padded batch: the same targets and bookkeeping; the root-to-
    completion path of its segments holds exactly the padded context, at positions 0, 1, …; each log-prob is
    read at the stream row holding the same context position; and the stream holds each group's prompt and
    answers once and nothing else."""
    for name in ROW_FIELDS:
        assert torch.equal(getattr(packed, name), getattr(padded, name)), name
    R, T = padded.targets.shape
    assert packed.num_rows == R and len(packed.row_segments) == R and packed.logprob_positions.shape == (R, T)
    assert packed.unpacked_tokens == int(padded.attention_mask.sum())
    if R == 0:
        assert packed.layout is None and packed.total_tokens == 0
        return
    layout = packed.layout
    stream, positions = packed.input_ids[0], packed.position_ids[0]
    assert packed.input_ids.shape == packed.position_ids.shape == (1, layout.total_tokens)
    assert torch.equal(positions, layout.position_ids())
    used = set()
    for k in range(R):
        n = int(padded.attention_mask[k].sum())
        c = int((padded.targets[k] != padded.ignore_index).sum())
        s = packed.row_segments[k]
        assert (packed.logprob_positions[k, c:] == 0).all()
        if c == 0:
            assert s == -1
            continue
        path = layout.ancestors(s) + [s]
        used.update(path)
        rows = torch.cat([torch.arange(layout.starts[a], layout.starts[a] + layout.lengths[a]) for a in path])
        assert torch.equal(stream[rows], padded.input_ids[k, :n])  # the context, token for token
        assert torch.equal(positions[rows], torch.arange(n))       # at its own positions
        assert layout.lengths[s] == c
        assert torch.equal(packed.logprob_positions[k, :c], rows[padded.logprob_positions[k, :c]])
    # shared: one [prompt | prefix] root per group with rows (none when it is empty: the answers are roots),
    # one segment per answer used, one per non-empty completion row — nothing repeated
    groups = {group_of[i] for i in padded.rollout.tolist()}
    answers = {(group_of[i], p) for i, p in zip(padded.rollout.tolist(), padded.positive.tolist())}
    prompt_roots = sum(1 for g in groups if heads[g])
    answer_roots = sum(1 for g, _ in answers if not heads[g])
    completions = [s for s in packed.row_segments if s != -1]
    assert sum(1 for p in layout.parents if p == -1) == prompt_roots + answer_roots
    assert layout.num_segments == prompt_roots + len(answers) + len(completions)
    assert len(set(completions)) == len(completions)
    if all(layout.lengths[s] for s in completions) and len(completions) == R:
        assert used == set(range(layout.num_segments))


# --- layout, by hand ------------------------------------------------------------------------------------------


def _mixed_case():
    prompts = [_ids(11, 12, 13), _ids(14)]
    completions = [_ids(20, 21), _ids(22), _ids(23, 24, 25), _ids(26, 27), _ids(30, 31, 32, 33), _ids(34)]
    rewards = [1.0, 0.0, 0.2, 0.0, 0.9, 0.3]
    answers = [_ids(50), _ids(51, 52)]
    wrong = [_ids(50), _ids(60), _ids(61, 62), _ids(63), _ids(51, 52), _ids(64, 65, 66)]
    return prompts, completions, rewards, [4, 2], answers, wrong


def test_mixed_groups_with_ties_and_variable_lengths_by_hand():
    packed, padded = _both(*_mixed_case(), answer_prefix_ids=_ids(7), answer_suffix_ids=_ids(8, 9))
    # group 0: [11 12 13 7] root, [50 8 9] r⁺, four completions, [60 8 9] r⁻ (rollout 1's), four completions
    # group 1: [14 7] root, [51 52 8 9] r⁺, two completions, [64 65 66 8 9] r⁻ (rollout 5's), two completions
    assert packed.input_ids[0].tolist() == [
        11, 12, 13, 7, 50, 8, 9, 20, 21, 22, 23, 24, 25, 26, 27, 60, 8, 9, 20, 21, 22, 23, 24, 25, 26, 27,
        14, 7, 51, 52, 8, 9, 30, 31, 32, 33, 34, 64, 65, 66, 8, 9, 30, 31, 32, 33, 34]
    assert packed.position_ids[0].tolist() == [
        0, 1, 2, 3, 4, 5, 6, 7, 8, 7, 7, 8, 9, 7, 8, 4, 5, 6, 7, 8, 7, 7, 8, 9, 7, 8,
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 6, 2, 3, 4, 5, 6, 7, 8, 9, 10, 7]
    layout = packed.layout
    assert layout.lengths == (4, 3, 2, 1, 3, 2, 3, 2, 1, 3, 2, 2, 4, 4, 1, 5, 4, 1)
    assert layout.parents == (-1, 0, 1, 1, 1, 1, 0, 6, 6, 6, 6, -1, 11, 12, 12, 11, 15, 15)
    assert packed.row_segments == (2, 3, 4, 5, 13, 14, 7, 8, 9, 10, 16, 17)
    # the first token of each completion is predicted by the last token of its answer segment (9 = suffix end)
    assert packed.logprob_positions.tolist() == [
        [6, 7, 0, 0], [6, 0, 0, 0], [6, 10, 11, 0], [6, 13, 0, 0], [31, 32, 33, 34], [31, 0, 0, 0],
        [17, 18, 0, 0], [17, 0, 0, 0], [17, 21, 22, 0], [17, 24, 0, 0], [41, 42, 43, 44], [41, 0, 0, 0]]
    assert packed.total_tokens == 47 and packed.unpacked_tokens == 108
    inputs = packed.model_inputs()
    assert set(inputs) == {"input_ids", "position_ids", "shared_prefix"} and inputs["shared_prefix"] is layout


def test_fallbacks_skipped_groups_and_rlsd_by_hand():
    prompts = [_ids(1, 2), _ids(3), _ids(4, 5), _ids(6)]
    completions = [_ids(10 + i, 40 + i) for i in range(9)]
    rewards = [1.0, 1.0,        # group 0: all equal → skipped, absent from the stream
               1.0, 0.8, 0.6,   # group 1: no rejected rollout → fallback
               0.0, 0.0,        # group 2: all equal → skipped
               0.1, 0.4]        # group 3: r⁻ = rollout 7's answer
    answers = [_ids(90), _ids(91), _ids(92), _ids(93)]
    wrong = [None, None, _ids(91), None, _ids(70), _ids(71), _ids(72), _ids(73), _ids(74)]
    sizes = [2, 3, 2, 2]

    packed, _ = _both(prompts, completions, rewards, sizes, answers, wrong)  # fallback grpo: group 1 skipped too
    assert packed.input_ids[0].tolist() == [6, 93, 17, 47, 18, 48, 73, 17, 47, 18, 48]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 2, 3, 1, 2, 3, 2, 3]
    assert (packed.layout.lengths, packed.layout.parents) == ((1, 1, 2, 2, 1, 2, 2), (-1, 0, 1, 1, 0, 4, 4))
    assert packed.logprob_positions.tolist() == [[1, 2], [1, 4], [6, 7], [6, 9]]

    packed, _ = _both(prompts, completions, rewards, sizes, answers, wrong, fallback="rlsd")
    # group 1: root, r⁺, three completions, no r⁻ (RLSD rows); group 3 as above
    assert packed.input_ids[0].tolist() == [3, 91, 12, 42, 13, 43, 14, 44, 6, 93, 17, 47, 18, 48, 73, 17, 47, 18, 48]
    assert packed.layout.parents == (-1, 0, 1, 1, 1, -1, 5, 6, 6, 5, 9, 9)
    assert packed.rollout.tolist() == [2, 3, 4, 7, 8, 7, 8] and packed.row_segments == (2, 3, 4, 7, 8, 10, 11)
    assert packed.logprob_positions.tolist() == [[1, 2], [1, 4], [1, 6], [9, 10], [9, 12], [14, 15], [14, 17]]

    packed, _ = _both(prompts, completions, rewards, sizes, answers, None, credit="rlsd")  # positive passes only
    assert packed.layout.parents == (-1, 0, 1, 1, 1, -1, 5, 6, 6)
    assert packed.positive.all() and packed.rlsd.tolist() == (~packed.skipped).tolist()


def test_advantages_empty_prompt_empty_completion_and_longer_T():
    # zero-advantage rollout 1 left out; no prompt and no prefix: the answers are roots; rollout 3's completion
    # is empty (a padding-only row, no segment); T = 5 > the longest completion
    prompts = [torch.zeros(0, dtype=torch.int64)]
    completions = [_ids(10, 11, 12), _ids(13), _ids(14, 15), torch.zeros(0, dtype=torch.int64)]
    advantages = torch.tensor([1.0, 0.0, -1.0, -0.5])
    packed, padded = _both(prompts, completions, [1.0, 0.5, 0.0, 0.2], [4], [_ids(9)], [None, None, _ids(8), None],
                           advantages=advantages, completion_length=5, answer_suffix_ids=_ids(4))
    assert packed.input_ids[0].tolist() == [9, 4, 10, 11, 12, 14, 15, 8, 4, 10, 11, 12, 14, 15]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 3, 4, 2, 3]
    assert packed.layout.parents == (-1, 0, 0, -1, 3, 3)
    assert packed.rollout.tolist() == [0, 2, 3, 0, 2, 3] and packed.row_segments == (1, 2, -1, 4, 5, -1)
    assert packed.logprob_positions.tolist() == [[1, 2, 3, 0, 0], [1, 5, 0, 0, 0], [0] * 5,
                                                 [8, 9, 10, 0, 0], [8, 12, 0, 0, 0], [0] * 5]
    assert packed.targets.shape == (6, 5) and (packed.targets[2] == -100).all()


def test_all_skipped_has_no_stream():
    prompts, completions, _, sizes, answers, wrong = _mixed_case()
    packed, _ = _both(prompts, completions, [1.0] * 6, sizes, answers, wrong)
    assert packed.num_rows == 0 and packed.layout is None and packed.skipped.all()
    pos, neg = packed.split(torch.zeros(0, 4))
    assert pos.shape == neg.shape == (6, 4) and not pos.any() and not neg.any()
    with pytest.raises(ValueError, match="no teacher rows"):
        packed.model_inputs()
    with pytest.raises(ValueError, match="no teacher rows"):
        packed.gather_hidden(torch.zeros(1, 0, 4))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4),                                       # prompt length
                          st.lists(st.tuples(st.integers(0, 5),                    # completion length
                                             st.sampled_from([0.0, 0.3, 1.0]),     # reward
                                             st.integers(0, 2)),                   # wrong-answer length
                                   min_size=1, max_size=4)),
                min_size=1, max_size=4),
       st.sampled_from([("cepo", "grpo"), ("cepo", "rlsd"), ("rlsd", "grpo")]), st.integers(0, 2))
def test_random_groups_match_the_padded_variant(groups, mode_fallback, affix):
    gen = torch.Generator().manual_seed(len(groups))

    def tokens(n):
        return torch.randint(0, 100, (n,), generator=gen)

    rollouts = [r for _, rs in groups for r in rs]
    if not any(r[0] for r in rollouts):
        rollouts[0] = (1,) + rollouts[0][1:]  # T ≥ 1
    mode, fallback = mode_fallback
    packed, _ = _both([tokens(p) for p, _ in groups], [tokens(n) for n, _, _ in rollouts],
                      [r for _, r, _ in rollouts], [len(rs) for _, rs in groups],
                      [tokens(1 + g % 2) for g in range(len(groups))],
                      [tokens(w) if w else None for _, _, w in rollouts] if mode == "cepo" else None,
                      credit=mode, fallback=fallback, answer_prefix_ids=tokens(affix) if affix else None,
                      answer_suffix_ids=tokens(affix - 1) if affix > 1 else None)


# --- the gather on a three-level tree -------------------------------------------------------------------------


def test_gather_hidden_values_and_deterministic_gradient():
    packed, _ = _both(*_mixed_case(), answer_suffix_ids=_ids(8))
    N, (R, T) = packed.total_tokens, packed.targets.shape
    hidden = torch.randn(1, N, 3, dtype=torch.float64, requires_grad=True)
    gathered = packed.gather_hidden(hidden)
    valid = packed.targets != packed.ignore_index
    assert gathered.shape == (R, T, 3)
    assert torch.equal(gathered[valid], hidden[0, packed.logprob_positions[valid]])
    assert (gathered[~valid] == 0).all()
    assert torch.equal(packed.gather_hidden(hidden[0]), gathered)
    upstream = torch.randn_like(gathered)
    (grad,) = torch.autograd.grad(gathered, hidden, upstream)
    expected = torch.zeros(N, 3, dtype=torch.float64).index_add_(
        0, packed.logprob_positions.flatten(), (upstream * valid[..., None]).reshape(-1, 3))
    torch.testing.assert_close(grad[0], expected, rtol=0, atol=1e-12)
    for _ in range(2):  # fixed-order sums: bitwise the same every time
        assert torch.equal(torch.autograd.grad(packed.gather_hidden(hidden), hidden, upstream)[0], grad)
    assert torch.autograd.gradcheck(packed.gather_hidden, (hidden[0].detach().requires_grad_(),))
    with pytest.raises(ValueError, match=f"T = {N}"):
        packed.gather_hidden(torch.zeros(1, N + 1, 3))


def test_packed_argument_errors():
    with pytest.raises(TypeError, match="packed must be a bool"):
        build_teacher_inputs(*_mixed_case(), packed="yes")
    assert "PackedTeacherInputs" in rlloss.teacher.__all__


# --- a tiny random transformers model end to end -------------------------------------------------------------


def _tiny_llama(head_dim):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    heads = 4 if head_dim == 8 else 2
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=head_dim,
                                      max_position_embeddings=128, initializer_range=0.2, attention_dropout=0.0)
    return transformers.LlamaForCausalLM(config).float().eval()


def _groups():
    """Four groups: mixed (CEPO), all accepted with different scores (fallback), all equal (skipped), mixed
    with a zero-advantage rollout; answer prefix and suffix around r±."""
    g = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(3, 128, (n,), generator=g)

    prompts = [ids(5), ids(3), ids(4), ids(6)]
    sizes = [3, 2, 2, 3]
    completions = [ids(n) for n in [6, 3, 5, 4, 7, 2, 3, 4, 1, 5]]
    rewards = torch.tensor([1.0, 0.0, 0.3, 1.0, 0.7, 0.0, 0.0, 0.0, 1.0, 0.5])
    answers = [ids(2), ids(1), ids(3), ids(2)]
    wrong = [None, ids(2), ids(1), None, None, ids(2), None, ids(3), None, None]
    return prompts, completions, rewards, sizes, answers, wrong, dict(answer_prefix_ids=ids(2),
                                                                       answer_suffix_ids=ids(1))


def _teacher_logprobs(model, teacher, backend):
    """The teacher pass: the decoder only (no lm_head, no logits) + the streaming log-prob kernel; the packed
    variant runs with shared-prefix attention on ``backend``."""
    from rlloss.integrations.transformers import disable_shared_prefix, enable_shared_prefix

    packed = isinstance(teacher, PackedTeacherInputs)
    if packed:
        enable_shared_prefix(model, backend=backend)
    try:
        with torch.no_grad():
            hidden = model.model(**teacher.model_inputs(), use_cache=False).last_hidden_state
            return rlloss.token_logprobs(teacher.gather_hidden(hidden), model.lm_head.weight, teacher.targets,
                                         backend=backend).logprobs
    finally:
        if packed:
            disable_shared_prefix(model)


def _assert_rel_close(actual, expected, rtol, what):
    err = ((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-30)).item()
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("mode,fallback", [("cepo", "rlsd"), ("cepo", "grpo"), ("rlsd", "grpo")])
def test_packed_teacher_pass_equals_padded(mode, fallback):
    """ℓ⁺ / ℓ⁻ from one packed shared-prefix run equal the right-padded batch's (sdpa) within 1e-5 relative,
    and so do the credit and the fused loss (value and lm_head gradient) built from them."""
    model = _tiny_llama(head_dim=8)
    prompts, completions, rewards, sizes, answers, wrong, affixes = _groups()
    advantages = rlloss.group_advantages(rewards, group_sizes=sizes)
    advantages[9] = 0.0  # a rollout with no teacher rows inside a group that has them
    args = (prompts, completions, rewards, sizes, answers, wrong if mode == "cepo" else None)
    kwargs = dict(credit=mode, fallback=fallback, advantages=advantages, **affixes)
    packed, padded = _both(*args, **kwargs)
    assert packed.total_tokens < packed.unpacked_tokens

    calls = []
    hook = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        lp_packed = _teacher_logprobs(model, packed, "torch")
    finally:
        hook.remove()
    assert calls == []  # no logits
    lp_padded = _teacher_logprobs(model, padded, "torch")
    valid = padded.targets != padded.ignore_index
    _assert_rel_close(lp_packed[valid], lp_padded[valid], 1e-5, "teacher log-probs")
    assert (lp_packed[~valid] == 0).all()

    B, T = len(completions), padded.targets.shape[1]
    mask = torch.zeros(B, T, dtype=torch.bool)
    targets = torch.zeros(B, T, dtype=torch.int64)
    for i, c in enumerate(completions):
        mask[i, : c.numel()], targets[i, : c.numel()] = True, c
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(B, T, 32, generator=gen)
    with torch.no_grad():  # near on-policy old log-probs: ratios inside the clip range, so gradients flow
        old = rlloss.token_logprobs(hidden, model.lm_head.weight, torch.where(mask, targets, -100),
                                    backend="torch").logprobs + 0.05 * torch.randn(B, T, generator=gen) * mask
    pos_p, neg_p = packed.split(lp_packed, base_logprobs=old)
    pos_d, neg_d = padded.split(lp_padded, base_logprobs=old)
    _assert_rel_close(pos_p, pos_d, 1e-5, "ℓ⁺")
    _assert_rel_close(neg_p, neg_d, 1e-5, "ℓ⁻")
    credit_p = contrastive_credit(advantages, mask, pos_p, neg_logprobs=neg_p, backend="torch")
    credit_d = contrastive_credit(advantages, mask, pos_d, neg_logprobs=neg_d, backend="torch")
    _assert_rel_close(credit_p, credit_d, 1e-5, "credit")
    assert not torch.equal(credit_d, advantages[:, None] * mask)  # the teacher changed something

    config = LossConfig.preset("verl_dapo", credit="cepo")
    results = []
    for pos, neg in ((pos_p, neg_p), (pos_d, neg_d)):
        weight = model.lm_head.weight.detach().clone().requires_grad_()
        out = FusedPolicyLoss(config, backend="torch")(hidden, weight, targets, mask, advantages, old_logprobs=old,
                                                       pos_logprobs=pos, neg_logprobs=neg)
        out.loss.backward()
        assert weight.grad.abs().sum() > 0
        results.append((out.loss.detach(), weight.grad))
    _assert_rel_close(results[0][0], results[1][0], 1e-5, "loss")
    _assert_rel_close(results[0][1], results[1][1], 1e-5, "lm_head gradient")


def test_packed_teacher_pass_kernel_backend():
    """The same through the shared-prefix Triton kernel (the interpreter on CPU) and the streaming log-prob
    kernel, on a model with head_dim 16 (the kernels' smallest)."""
    model = _tiny_llama(head_dim=16)
    prompts, completions, rewards, sizes, answers, wrong, affixes = _groups()
    packed, padded = _both(prompts[:1], completions[:3], rewards[:3], sizes[:1], answers[:1], wrong[:3], **affixes)
    lp_packed = _teacher_logprobs(model, packed, KERNEL_BACKEND)
    lp_padded = _teacher_logprobs(model, padded, KERNEL_BACKEND)
    valid = padded.targets != padded.ignore_index
    _assert_rel_close(lp_packed[valid], lp_padded[valid], 1e-5 if INTERPRETED else 1e-4,
                      "teacher log-probs")


@pytest.mark.parametrize("name", ["build_teacher_inputs", "TeacherInputs", "PackedTeacherInputs"])
def test_old_credit_path_warns_and_still_works(name):
    """The teacher-input builder moved from rlloss.credit to rlloss.teacher: the old path is a shim for one
    release that warns and returns the same object."""
    with pytest.warns(DeprecationWarning, match=f"rlloss.teacher.{name}"):
        moved = getattr(rlloss.credit, name)
    assert moved is getattr(rlloss.teacher, name)
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        rlloss.credit.nothing_here
