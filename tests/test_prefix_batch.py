"""SharedPrefixBatch: packing, positions, gather indices (exact, by hand and against a per-sequence
construction), the differentiable gather, unpacking and input errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlloss
from rlloss import SharedPrefixBatch, SharedPrefixLayout


def ids(*values):
    return torch.tensor(values, dtype=torch.int64)


def test_one_prompt_token_one_completion_token():
    batch = SharedPrefixBatch.pack([ids(7)], [[ids(9)]])
    assert batch.input_ids.tolist() == [[7, 9]]
    assert batch.position_ids.tolist() == [[0, 1]]
    assert batch.predictor_index.tolist() == [[0]]
    assert batch.token_index.tolist() == [[1]]
    assert batch.targets.tolist() == [[9]]
    assert batch.mask.tolist() == [[True]]
    assert (batch.layout.lengths, batch.layout.parents) == ((1, 1), (-1, 0))
    assert (batch.total_tokens, batch.num_completions, batch.group_sizes, batch.num_completion_tokens) == (2, 1, (1,), 1)


def test_several_groups_by_hand():
    # group 0: prompt [10 11 12], completions [20 21], [30 31 32]; group 1: prompt [40 41], completion [50]
    batch = SharedPrefixBatch.pack([ids(10, 11, 12), ids(40, 41)],
                                   [[ids(20, 21), ids(30, 31, 32)], [ids(50)]])
    # stream rows:   0   1   2   3   4   5   6   7   8   9  10
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21, 30, 31, 32, 40, 41, 50]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 2]]
    assert batch.predictor_index.tolist() == [[2, 3, 0], [2, 5, 6], [9, 0, 0]]
    assert batch.token_index.tolist() == [[3, 4, 0], [5, 6, 7], [10, 0, 0]]
    assert batch.targets.tolist() == [[20, 21, -100], [30, 31, 32], [50, -100, -100]]
    assert batch.mask.tolist() == [[True, True, False], [True, True, True], [True, False, False]]
    assert batch.layout.starts == (0, 3, 5, 8, 10)
    assert batch.layout.parents == (-1, 0, 0, -1, 3)
    assert batch.prompt_lengths == (3, 2) and batch.completion_lengths == ((2, 3), (1,))
    assert batch.group_sizes == (2, 1) and batch.num_completion_tokens == 6
    inputs = batch.model_inputs()
    assert set(inputs) == {"input_ids", "position_ids", "shared_prefix"} and inputs["shared_prefix"] is batch.layout
    assert torch.equal(batch.position_ids[0], batch.layout.position_ids())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.lists(st.integers(1, 6), min_size=1, max_size=4)),
                min_size=1, max_size=4))
def test_indices_match_each_sequence_run_on_its_own(groups):
    """Row predictor_index[c, j] of the stream holds the token and position that sit at P + j − 1 of the
    standalone sequence [prompt | completion_c]; token_index[c, j] holds its token j at position P + j."""
    gen = torch.Generator().manual_seed(len(groups))
    prompts = [torch.randint(0, 1000, (p,), generator=gen) for p, _ in groups]
    completions = [[torch.randint(0, 1000, (s,), generator=gen) for s in ss] for _, ss in groups]
    batch = SharedPrefixBatch.pack(prompts, completions)
    stream, positions = batch.input_ids[0], batch.position_ids[0]
    S_max = max(s for _, ss in groups for s in ss)
    assert batch.mask.shape == (sum(len(ss) for _, ss in groups), S_max)
    assert batch.layout.total_tokens == stream.numel() == sum(p + sum(ss) for p, ss in groups)
    c = 0
    for prompt, comps in zip(prompts, completions):
        P = prompt.numel()
        for comp in comps:
            sequence, S = torch.cat([prompt, comp]), comp.numel()
            predictor, token = batch.predictor_index[c, :S], batch.token_index[c, :S]
            assert torch.equal(stream[predictor], sequence[P - 1: P + S - 1])
            assert torch.equal(positions[predictor], torch.arange(P - 1, P + S - 1))
            assert torch.equal(stream[token], comp) and torch.equal(positions[token], torch.arange(P, P + S))
            assert torch.equal(batch.targets[c, :S], comp)
            assert batch.mask[c].sum() == S and not batch.mask[c, S:].any()
            assert (batch.targets[c, S:] == -100).all()
            c += 1


def test_gather_hidden_values_and_gradients():
    batch = SharedPrefixBatch.pack([ids(1, 2, 3), ids(4)], [[ids(5), ids(6, 7), ids(8, 9, 10)], [ids(11, 12)]])
    T, D = batch.total_tokens, 5
    hidden = torch.randn(1, T, D, requires_grad=True)
    gathered = batch.gather_hidden(hidden)
    assert gathered.shape == (4, 3, D)
    assert torch.equal(gathered[batch.mask], hidden[0][batch.predictor_index[batch.mask]])
    assert (gathered[~batch.mask] == 0).all()
    assert torch.equal(batch.gather_hidden(hidden[0]), gathered)  # [T, D] works as [1, T, D]
    upstream = torch.randn_like(gathered)  # padding slots too: they are constants and pass nothing back
    gathered.backward(upstream)
    expected = torch.zeros(T, D).index_add_(0, batch.predictor_index.flatten(),
                                            (upstream * batch.mask[..., None]).reshape(-1, D))
    torch.testing.assert_close(hidden.grad[0], expected, rtol=0, atol=1e-6)
    # the prompt's last row predicts the first token of each of its 3 completions
    torch.testing.assert_close(hidden.grad[0, 2], upstream[:3, 0].sum(0), rtol=0, atol=1e-6)
    assert (hidden.grad[0, [3, 5, 8, 11]] == 0).all()  # each completion's last token predicts nothing


def test_gather_hidden_gradcheck():
    batch = SharedPrefixBatch.pack([ids(1, 2), ids(3, 4, 5)], [[ids(6, 7, 8), ids(9)], [ids(1), ids(2, 3), ids(4)]])
    hidden = torch.randn(batch.total_tokens, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(batch.gather_hidden, (hidden,))


def test_gather_hidden_backward_is_deterministic():
    prompts, completions = [ids(*range(5))] * 3, [[ids(*range(s)) for s in (4, 1, 7, 2)]] * 3
    batch = SharedPrefixBatch.pack(prompts, completions)
    hidden = torch.randn(batch.total_tokens, 64, requires_grad=True)
    upstream = torch.randn(*batch.mask.shape, 64)
    first = torch.autograd.grad(batch.gather_hidden(hidden), hidden, upstream)[0]
    for _ in range(3):
        assert torch.equal(torch.autograd.grad(batch.gather_hidden(hidden), hidden, upstream)[0], first)


def test_gather_works_on_any_trailing_shape():
    batch = SharedPrefixBatch.pack([ids(1, 2)], [[ids(3, 4), ids(5)]])
    logits = torch.randn(1, batch.total_tokens, 4, 7)
    assert batch.gather_hidden(logits).shape == (2, 2, 4, 7)
    assert batch.gather_hidden(torch.arange(batch.total_tokens)).tolist() == [[1, 2], [1, 0]]  # 0: padding


def test_unpack_drops_padding():
    batch = SharedPrefixBatch.pack([ids(1), ids(2, 3)], [[ids(4, 5, 6), ids(7)], [ids(8, 9)]])
    parts = batch.unpack(batch.targets)
    assert [[p.tolist() for p in group] for group in parts] == [[[4, 5, 6], [7]], [[8, 9]]]
    values = torch.randn(3, 3, 2)
    assert batch.unpack(values)[1][0].shape == (2, 2)
    with pytest.raises(ValueError, match=r"\[C, S_max, \.\.\.\]"):
        batch.unpack(torch.zeros(3, 2))
    with pytest.raises(TypeError, match="values must be a torch.Tensor"):
        batch.unpack([1, 2])


def test_to_keeps_everything_on_one_device():
    batch = SharedPrefixBatch.pack([ids(1, 2)], [[ids(3)]]).to("cpu")
    assert isinstance(batch.layout, SharedPrefixLayout) and batch.layout.device == batch.input_ids.device
    assert batch.predictor_index.device == batch.mask.device == torch.device("cpu")


def test_exported():
    assert rlloss.SharedPrefixBatch is SharedPrefixBatch and "SharedPrefixBatch" in rlloss.__all__


@pytest.mark.parametrize("prompts, completions, error, match", [
    ([], [], ValueError, "prompt_ids is empty"),
    ([ids(1)], [], ValueError, "one list per prompt: 1 prompts, got 0"),
    ([ids(1), ids(2)], [[ids(3)]], ValueError, "one list per prompt: 2 prompts, got 1"),
    ([ids(1)], [[]], ValueError, r"completion_ids\[0\] is empty"),
    ([torch.zeros(0, dtype=torch.int64)], [[ids(1)]], ValueError, r"prompt_ids\[0\] is empty"),
    ([ids(1)], [[ids(2), torch.zeros(0, dtype=torch.int64)]], ValueError, r"completion_ids\[0\]\[1\] is empty"),
    ([ids(1, 2)[None]], [[ids(3)]], ValueError, r"prompt_ids\[0\] must be a 1-D tensor.*\(1, 2\)"),
    ([ids(1)], [[ids(2)[None]]], ValueError, r"completion_ids\[0\]\[0\] must be a 1-D"),
    ([ids(1).int()], [[ids(2)]], TypeError, r"prompt_ids\[0\] must have dtype int64, got int32"),
    ([ids(1)], [[ids(2).float()]], TypeError, r"completion_ids\[0\]\[0\] must have dtype int64, got float32"),
    ([[1, 2]], [[ids(2)]], TypeError, r"prompt_ids\[0\] must be a 1-D torch.Tensor"),
    (ids(1, 2), [[ids(2)]], TypeError, "prompt_ids must be a list of 1-D tensors, got Tensor"),
    ([ids(1)], [ids(2)], TypeError, r"completion_ids\[0\] must be a list of 1-D tensors, got Tensor"),
    ([ids(1)], [[ids(2).to("meta")]], ValueError, "on one device"),
])
def test_pack_errors(prompts, completions, error, match):
    with pytest.raises(error, match=match):
        SharedPrefixBatch.pack(prompts, completions)


def test_gather_errors():
    batch = SharedPrefixBatch.pack([ids(1, 2)], [[ids(3)]])
    with pytest.raises(ValueError, match=r"\[1, T, \.\.\.\] or \[T, \.\.\.\] with T = 3"):
        batch.gather_hidden(torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match="T = 3"):
        batch.gather_hidden(torch.zeros(2, 3, 2))
    with pytest.raises(ValueError, match="on meta"):
        batch.gather_hidden(torch.zeros(3, 2, device="meta"))
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor"):
        batch.gather_hidden(None)


# --- the padded batch (packed=False) and when packing pays ---------------------------------------------------


def test_padded_batch_by_hand():
    batch = SharedPrefixBatch.pack([ids(1, 2, 3), ids(4)], [[ids(5, 6), ids(7)], [ids(8, 9, 10)]], packed=False)
    assert not batch.packed and batch.layout is None
    assert batch.input_ids.tolist() == [[1, 2, 3, 5, 6, 0], [1, 2, 3, 7, 0, 0], [0, 0, 4, 8, 9, 10]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    assert batch.position_ids[batch.attention_mask.bool()].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3]
    assert batch.predictor_index.tolist() == [[2, 3, 0], [8, 0, 0], [14, 15, 16]]  # rows of [C·L]
    assert batch.targets.tolist() == [[5, 6, -100], [7, -100, -100], [8, 9, 10]]
    assert set(batch.model_inputs()) == {"input_ids", "position_ids", "attention_mask"}
    assert (batch.total_tokens, batch.group_sizes, batch.num_completion_tokens) == (18, (2, 1), 6)
    assert [[x.tolist() for x in g] for g in batch.unpack(batch.targets)] == [[[5, 6], [7]], [[8, 9, 10]]]
    hidden = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)  # [C, L, D] of the padded batch
    gathered = batch.gather_hidden(hidden)
    assert torch.equal(gathered[2], hidden[2, 2:5]) and (gathered[~batch.mask] == 0).all()
    assert torch.autograd.gradcheck(batch.gather_hidden, (hidden,))
    assert batch.to("cpu").attention_mask is not None


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.lists(st.integers(1, 6), min_size=1, max_size=4)),
                min_size=1, max_size=3))
def test_padded_and_packed_batches_gather_the_same_tokens(groups):
    """Both layouts put the same token and position at every predictor row, and the same targets and mask."""
    gen = torch.Generator().manual_seed(len(groups))
    prompts = [torch.randint(0, 1000, (p,), generator=gen) for p, _ in groups]
    completions = [[torch.randint(0, 1000, (s,), generator=gen) for s in ss] for _, ss in groups]
    packed = SharedPrefixBatch.pack(prompts, completions)
    padded = SharedPrefixBatch.pack(prompts, completions, packed=False)
    for name in ("targets", "mask"):
        assert torch.equal(getattr(packed, name), getattr(padded, name))
    m = packed.mask
    for field in ("input_ids", "position_ids"):
        a = getattr(packed, field)[0][packed.predictor_index][m]
        b = getattr(padded, field).flatten()[padded.predictor_index][m]
        assert torch.equal(a, b), field


def test_packing_pays_rule():
    pays = SharedPrefixBatch.packing_pays
    assert not pays([64], [[64]])                      # one completion: 1.0
    assert not pays([16], [[128, 128, 128, 128]])      # long completions of a short prompt: 1.03
    assert pays([64], [[64, 64]])                      # 256 / 192 = 1.33
    assert pays([128], [[32] * 4])                     # 640 / 256 = 2.5
    assert not pays([64], [[64, 64]], min_token_ratio=1.5)
    assert pays([8], [[1, 100]])                       # padding counts: 2 · 108 / 109
    auto = SharedPrefixBatch.pack([ids(*range(20))], [[ids(1, 2)] * 4], packed="auto")
    assert auto.packed
    auto = SharedPrefixBatch.pack([ids(1)], [[ids(*range(20))]], packed="auto")
    assert not auto.packed and auto.input_ids.shape == (1, 21)
    with pytest.raises(ValueError, match="packed must be True, False or 'auto', got 'yes'"):
        SharedPrefixBatch.pack([ids(1)], [[ids(2)]], packed="yes")
    with pytest.raises(ValueError, match="one list of lengths per prompt"):
        pays([1, 2], [[1]])
    with pytest.raises(ValueError, match=r"prompt_lengths\[0\] must be >= 1"):
        pays([0], [[1]])
