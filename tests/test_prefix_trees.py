"""SharedPrefixBatch.pack_tree: rollout trees (multi-turn, agentic) packed into one shared-prefix stream.

Indices are checked exactly against each root-to-leaf sequence built on its own; the packed run of a real
transformers model (tiny random configs, no downloads) must give the logits of every position and every
parameter gradient of a loss over the scored tokens that running each root-to-leaf sequence alone gives.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlloss import SharedPrefixBatch


def ids(*values):
    return torch.tensor(values, dtype=torch.int64)


# --- packing by hand ---------------------------------------------------------------------------------------


def test_multi_turn_tree_by_hand():
    # prompt [1 2] → assistant [3 4] → tool [5] → two branches of the next assistant turn: [6 7] and [8]
    batch = SharedPrefixBatch.pack_tree([ids(1, 2), ids(3, 4), ids(5), ids(6, 7), ids(8)], [-1, 0, 1, 2, 2],
                                        [False, True, False, True, True])
    # stream rows:                    0  1  2  3  4  5  6  7
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 5]]
    assert batch.scored_segments == (1, 3, 4)
    assert batch.predictor_index.tolist() == [[1, 2], [4, 5], [4, 0]]
    assert batch.token_index.tolist() == [[2, 3], [5, 6], [7, 0]]
    assert batch.targets.tolist() == [[3, 4], [6, 7], [8, -100]]
    assert batch.mask.tolist() == [[True, True], [True, True], [True, False]]
    assert batch.prompt_lengths == (2,) and batch.completion_lengths == ((2, 2, 1),)
    assert batch.group_sizes == (3,) and batch.num_completions == 3 and batch.num_completion_tokens == 5
    assert batch.paths() == [(0, 1, 2, 3), (0, 1, 2, 4)]
    assert batch.path_rows() == [(0, 1), (0, 2)]
    assert [[x.tolist() for x in tree] for tree in batch.unpack(batch.targets)] == [[[3, 4], [6, 7], [8]]]


def test_pack_tree_of_two_levels_equals_pack():
    prompts, completions = [ids(1, 2, 3), ids(4)], [[ids(5, 6), ids(7)], [ids(8, 9, 10)]]
    a = SharedPrefixBatch.pack(prompts, completions)
    b = SharedPrefixBatch.pack_tree([prompts[0], *completions[0], prompts[1], *completions[1]], [-1, 0, 0, -1, 3])
    for name in ("input_ids", "position_ids", "predictor_index", "token_index", "targets", "mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.prompt_lengths, a.completion_lengths, a.scored_segments) == \
        (b.prompt_lengths, b.completion_lengths, b.scored_segments)
    assert a.layout.parents == b.layout.parents


def test_scored_parent_of_a_scored_child_gradient():
    """A scored segment that is the parent of scored segments (a branch inside a model turn): its last row
    predicts only its children's first tokens, and the gather's backward sums those."""
    batch = SharedPrefixBatch.pack_tree([ids(1), ids(2, 3), ids(4), ids(5, 6)], [-1, 0, 1, 1])
    assert batch.predictor_index.tolist() == [[0, 1], [2, 0], [2, 4]]
    hidden = torch.randn(batch.total_tokens, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(batch.gather_hidden, (hidden,))
    upstream = torch.randn(*batch.mask.shape, 3, dtype=torch.float64)
    grad = torch.autograd.grad(batch.gather_hidden(hidden), hidden, upstream)[0]
    expected = torch.zeros_like(grad).index_add_(0, batch.predictor_index.flatten(),
                                                 (upstream * batch.mask[..., None]).reshape(-1, 3))
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)


@st.composite
def forests(draw):
    lengths, parents, scored = [], [], []
    for _ in range(draw(st.integers(1, 3))):  # trees
        root = len(lengths)
        lengths.append(draw(st.integers(1, 5)))
        parents.append(-1)
        scored.append(False)
        for _ in range(draw(st.integers(1, 5))):  # a parent among this tree's segments so far
            parents.append(draw(st.integers(root, len(lengths) - 1)))
            lengths.append(draw(st.integers(1, 5)))
            scored.append(draw(st.booleans()))
        if not any(scored[root:]):
            scored[-1] = True
    return lengths, parents, scored


@settings(max_examples=40, deadline=None)
@given(forests())
def test_indices_match_each_root_to_leaf_sequence(forest):
    """predictor_index[c, j] holds the token and position at (offset + j − 1) of the root-to-segment sequence
    of the c-th scored segment, token_index[c, j] its token j at position offset + j."""
    lengths, parents, scored = forest
    gen = torch.Generator().manual_seed(sum(lengths))
    segments = [torch.randint(0, 1000, (n,), generator=gen) for n in lengths]
    batch = SharedPrefixBatch.pack_tree(segments, parents, scored)
    stream, positions = batch.input_ids[0], batch.position_ids[0]
    assert batch.scored_segments == tuple(s for s in range(len(lengths)) if scored[s])
    for c, s in enumerate(batch.scored_segments):
        chain = batch.layout.ancestors(s)
        sequence = torch.cat([segments[a] for a in chain] + [segments[s]])
        offset, S = sequence.numel() - lengths[s], lengths[s]
        predictor, token = batch.predictor_index[c, :S], batch.token_index[c, :S]
        assert torch.equal(stream[predictor], sequence[offset - 1: offset + S - 1])
        assert torch.equal(positions[predictor], torch.arange(offset - 1, offset + S - 1))
        assert torch.equal(stream[token], segments[s])
        assert torch.equal(positions[token], torch.arange(offset, offset + S))
        assert torch.equal(batch.targets[c, :S], segments[s]) and batch.mask[c].sum() == S
    # every scored segment lies on some path, and the paths are the chains to the leaves
    assert sorted({c for rows in batch.path_rows() for c in rows}) == list(range(batch.num_completions))
    leaves = [s for s in range(len(lengths)) if s not in parents]
    assert [path[-1] for path in batch.paths()] == leaves
    assert sum(batch.group_sizes) == batch.num_completions


@pytest.mark.parametrize("segments, parents, scored, error, match", [
    ([], [], None, ValueError, "segment_ids is empty"),
    ([ids(1), ids(2)], [-1], None, ValueError, "one entry per segment: 2 segments, got 1"),
    ([ids(1), ids(2)], [-1, 0], [True, True], ValueError, r"scored\[0\] is True but segment 0 is a root"),
    ([ids(1), ids(2)], [-1, 0], [False, False], ValueError, "no segment is scored"),
    ([ids(1), ids(2)], [-1, 0], [False], ValueError, "scored must hold one entry per segment"),
    ([ids(1), ids(2)], [-1, 0], [0, 1], TypeError, r"scored\[0\] must be a bool, got int"),
    ([ids(1), ids(2)], [-1, 1], None, ValueError, r"parents\[1\] must be -1 or an earlier segment"),
    ([ids(1), ids(2)], [-1, 0.0], None, TypeError, r"parents\[1\] must be an int"),
    ([ids(1), ids(2), ids(3)], [-1, -1, 0], None, ValueError, "segment 2 belongs to the tree of segment 0 but"),
    ([ids(1), torch.zeros(0, dtype=torch.int64)], [-1, 0], None, ValueError, r"segment_ids\[1\] is empty"),
    ([ids(1), ids(-3)], [-1, 0], None, ValueError, r"segment_ids\[1\] must hold token ids >= 0"),
    ([ids(1), ids(2).int()], [-1, 0], None, TypeError, r"segment_ids\[1\] must have dtype int64"),
    (ids(1, 2), [-1, 0], None, TypeError, "segment_ids must be a list of 1-D tensors"),
    ([ids(1), ids(2)], [-1, 0], "yes", TypeError, "scored must be a list of bools"),
])
def test_pack_tree_errors(segments, parents, scored, error, match):
    with pytest.raises(error, match=match):
        SharedPrefixBatch.pack_tree(segments, parents, scored)


# --- equivalence with running each root-to-leaf sequence through a real model ------------------------------

transformers = pytest.importorskip("transformers")
from rlloss import token_logprobs  # noqa: E402
from rlloss.integrations.transformers import disable_shared_prefix, enable_shared_prefix  # noqa: E402

VOCAB = 97
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, attention_dropout=0.0, initializer_range=0.1)
RTOL = 1e-5

# Two rollout trees. Tree 1, a multi-turn agentic rollout: prompt → assistant turn → tool output → two
# branches of the next assistant turn; a second branch at the prompt whose assistant turn branches mid-turn
# (scored children of a scored segment). Tree 2: prompt → assistant → user turn → assistant.
TREE_LENGTHS = (6, 4, 3, 5, 2, 3, 2, 1, 2, 3, 2, 4)
TREE_PARENTS = (-1, 0, 1, 2, 2, 0, 5, 5, -1, 8, 9, 10)
TREE_SCORED = (False, True, False, True, True, True, True, True, False, True, False, True)


def tiny_model(name):
    config_class, model_class = (getattr(transformers, f"{name}Config"), getattr(transformers, f"{name}ForCausalLM"))
    torch.manual_seed(0)
    return model_class(config_class(**TINY)).float().eval()


def tree_segments(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen) for n in TREE_LENGTHS]


from test_integration_transformers import assert_rel_close, grads, weighted_nll  # noqa: E402  (shared helpers)


@pytest.mark.parametrize("name", [n for n in ("Llama", "Qwen2", "Qwen3", "Mistral")
                                  if hasattr(transformers, f"{n}ForCausalLM")])
def test_tree_equals_each_root_to_leaf_sequence(name):
    """Logits at every stream position, the loss over the scored tokens (each scored segment counted once)
    and every parameter gradient equal those of running each root-to-leaf sequence alone (sdpa)."""
    model = tiny_model(name)
    segments = tree_segments()
    batch = SharedPrefixBatch.pack_tree(segments, TREE_PARENTS, TREE_SCORED)
    weights = torch.randn(batch.mask.shape, generator=torch.Generator().manual_seed(2)) * batch.mask

    enable_shared_prefix(model, backend="torch")
    try:
        packed_logits = model(**batch.model_inputs(), use_cache=False).logits[0]
    finally:
        disable_shared_prefix(model)
    gathered = batch.gather_hidden(packed_logits)
    packed_loss = sum(weighted_nll(gathered[c, :n], batch.targets[c, :n], weights[c, :n])
                      for c, n in enumerate(batch.mask.sum(1).tolist()))
    packed_loss.backward()
    packed_grads = grads(model)
    model.zero_grad(set_to_none=True)

    # Each root-to-leaf sequence alone; every segment's logits are checked in every sequence through it, and
    # each scored segment enters the loss once, from the first sequence through it.
    seq_loss, counted = 0.0, set()
    row_of = {s: c for c, s in enumerate(batch.scored_segments)}
    for path in batch.paths():
        logits = model(input_ids=torch.cat([segments[s] for s in path])[None], use_cache=False).logits[0]
        offset = 0
        for s in path:
            n, start = TREE_LENGTHS[s], batch.layout.starts[s]
            assert_rel_close(packed_logits[start: start + n], logits[offset: offset + n], RTOL,
                             f"logits of segment {s} on path {path}")
            if s in row_of and s not in counted:
                c = row_of[s]
                seq_loss = seq_loss + weighted_nll(logits[offset - 1: offset + n - 1], segments[s], weights[c, :n])
                counted.add(s)
            offset += n
    assert counted == set(batch.scored_segments)
    seq_loss.backward()
    assert_rel_close(packed_loss.detach(), seq_loss.detach(), RTOL, "loss")
    for pname, grad in grads(model).items():
        assert_rel_close(packed_grads[pname], grad, RTOL, f"grad of {pname}")


def test_tree_logprobs_from_gathered_hidden_states_per_rollout():
    """token_logprobs on the gathered final hidden states: each rollout's scored log-probs (path_rows) equal
    those of its own sequence, and a per-rollout loss weighted by path_rows gives the per-sequence gradients."""
    model = tiny_model("Qwen2")
    segments = tree_segments(seed=3)
    batch = SharedPrefixBatch.pack_tree(segments, TREE_PARENTS, TREE_SCORED)
    paths, path_rows = batch.paths(), batch.path_rows()
    advantages = torch.randn(len(paths), generator=torch.Generator().manual_seed(4))  # one per rollout

    enable_shared_prefix(model, backend="torch")
    hidden = model.model(**batch.model_inputs(), use_cache=False).last_hidden_state
    disable_shared_prefix(model)
    logprobs = token_logprobs(batch.gather_hidden(hidden), model.lm_head.weight, batch.targets).logprobs
    # a row's weight: the sum of the advantages of the rollouts through it (counted once per rollout)
    row_weight = torch.zeros(batch.num_completions).index_add_(
        0, torch.tensor([c for rows in path_rows for c in rows]),
        torch.cat([advantages[i].expand(len(rows)) for i, rows in enumerate(path_rows)]))
    packed_loss = -(row_weight[:, None] * logprobs * batch.mask).sum()
    packed_loss.backward()
    packed_grads = grads(model)
    model.zero_grad(set_to_none=True)

    seq_loss = 0.0
    for i, path in enumerate(paths):
        sequence = torch.cat([segments[s] for s in path])
        h = model.model(input_ids=sequence[None], use_cache=False).last_hidden_state[0]
        logp = torch.log_softmax(model.lm_head(h[:-1]), -1).gather(1, sequence[1:, None]).squeeze(1)
        offset, chosen = 0, []
        for s in path:
            if s in batch.scored_segments:
                chosen.append(torch.arange(offset - 1, offset - 1 + TREE_LENGTHS[s]))
                c = batch.scored_segments.index(s)
                assert_rel_close(logprobs[c, :TREE_LENGTHS[s]].detach(), logp[chosen[-1]].detach(), RTOL,
                                 f"log-probs of segment {s} on path {path}")
            offset += TREE_LENGTHS[s]
        seq_loss = seq_loss - advantages[i] * logp[torch.cat(chosen)].sum()
    seq_loss.backward()
    assert_rel_close(packed_loss.detach(), seq_loss.detach(), RTOL, "loss")
    for pname, grad in grads(model).items():
        assert_rel_close(packed_grads[pname], grad, RTOL, f"grad of {pname}")
