"""Shared-prefix attention inside real transformers models (tiny random configs, no downloads).

The packed run — every prompt once, its completions after it, `enable_shared_prefix` — must give the same
logits at every position and the same gradient of every parameter as running each [prompt | completion]
sequence on its own through the model's own attention (sdpa), with the loss summed over the sequences.
"""
import copy
import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers")

import rlloss  # noqa: E402
from rlloss import FusedPolicyLoss, LossConfig, SharedPrefixBatch  # noqa: E402
from rlloss.integrations import transformers as integration  # noqa: E402
from rlloss.integrations.transformers import (  # noqa: E402
    attention_implementation_name, disable_shared_prefix, enable_shared_prefix, shared_prefix, shared_prefix_enabled)

from conftest import INTERPRETED, KERNEL_BACKEND  # noqa: E402

VOCAB = 97
# Grouped-query attention: 4 query heads share 2 key/value heads.
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, attention_dropout=0.0,
            initializer_range=0.1)  # wider than the default 0.02, so the softmaxes are far from uniform
# Two groups of three completions, lengths that are no multiple of anything.
PROMPT_LENGTHS = (7, 4)
COMPLETION_LENGTHS = ((3, 1, 6), (5, 2, 3))
RTOL = 1e-5

KERNEL_MISSING = importlib.util.find_spec("rlloss.kernels.prefix_attention") is None


def model_classes():
    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM")}
    return {name: (getattr(transformers, c), getattr(transformers, m)) for name, (c, m) in classes.items()
            if hasattr(transformers, m)}


def tiny_model(name, **overrides):
    config_class, model_class = model_classes()[name]
    torch.manual_seed(0)
    return model_class(config_class(**{**TINY, **overrides})).float().eval()


def make_groups(prompt_lengths=PROMPT_LENGTHS, completion_lengths=COMPLETION_LENGTHS, seed=1):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, VOCAB, (p,), generator=gen) for p in prompt_lengths]
    completions = [[torch.randint(0, VOCAB, (s,), generator=gen) for s in group] for group in completion_lengths]
    return prompts, completions


def sequences(prompts, completions):
    """(prompt, completion) of every completion, in the batch's order."""
    return [(p, c) for p, group in zip(prompts, completions) for c in group]


def token_weights(batch, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch.mask.shape, generator=gen) * batch.mask


def weighted_nll(logits, targets, weights):
    """Σ w·(−log p(target)) over one sequence's completion tokens: a loss with a different weight per token."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    return -(weights * logp).sum()


def packed_run(model, batch, backend="torch"):
    """Logits [T, V] of the packed stream and the loss on the completion tokens."""
    enable_shared_prefix(model, backend=backend)
    try:
        logits = model(**batch.model_inputs(), use_cache=False).logits[0]
    finally:
        disable_shared_prefix(model)
    weights = token_weights(batch)
    gathered = batch.gather_hidden(logits)
    loss = sum(weighted_nll(gathered[c, :n], batch.targets[c, :n], weights[c, :n])
               for c, n in enumerate(batch.mask.sum(1).tolist()))
    return logits, loss


def separate_runs(model, batch, prompts, completions):
    """Per-sequence logits [P + S, V] and the summed loss, each sequence alone through the model's own attention."""
    weights = token_weights(batch)
    all_logits, loss = [], 0.0
    for c, (prompt, completion) in enumerate(sequences(prompts, completions)):
        P, S = prompt.numel(), completion.numel()
        logits = model(input_ids=torch.cat([prompt, completion])[None], use_cache=False).logits[0]
        all_logits.append(logits)
        loss = loss + weighted_nll(logits[P - 1: P + S - 1], completion, weights[c, :S])
    return all_logits, loss


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_rel_close(actual, expected, rtol, what):
    scale = expected.abs().max().clamp(min=1e-30)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


def check_equivalence(model, prompts, completions, backend="torch", rtol=RTOL):
    batch = SharedPrefixBatch.pack(prompts, completions)
    original = model.config._attn_implementation

    model.zero_grad(set_to_none=True)
    packed_logits, packed_loss = packed_run(model, batch, backend)
    packed_loss.backward()
    packed_grads = grads(model)
    assert model.config._attn_implementation == original

    model.zero_grad(set_to_none=True)
    seq_logits, seq_loss = separate_runs(model, batch, prompts, completions)
    seq_loss.backward()
    seq_grads = grads(model)

    assert_rel_close(packed_loss.detach(), seq_loss.detach(), rtol, "loss")
    stream = 0
    for g, (prompt, group) in enumerate(zip(prompts, completions)):
        P = prompt.numel()
        first = sum(len(c) for c in completions[:g])
        # prompt rows: the same in every sequence of the group
        assert_rel_close(packed_logits[stream: stream + P], seq_logits[first][:P], rtol, f"group {g} prompt logits")
        stream += P
        for i, completion in enumerate(group):
            S = completion.numel()
            assert_rel_close(packed_logits[stream: stream + S], seq_logits[first + i][P:], rtol,
                             f"group {g} completion {i} logits")
            stream += S
    assert stream == batch.total_tokens
    assert packed_grads.keys() == seq_grads.keys()
    for name in seq_grads:
        assert_rel_close(packed_grads[name], seq_grads[name], rtol, f"grad of {name}")


# --- equivalence with running each sequence on its own ---------------------------------------------------


@pytest.mark.parametrize("name", sorted(model_classes()))
def test_packed_equals_separate_sequences(name):
    """Logits at every position and every parameter gradient (torch backend of shared_prefix_attention)."""
    check_equivalence(tiny_model(name), *make_groups())


def test_single_token_prompt_and_completions():
    check_equivalence(tiny_model("llama"), *make_groups((1, 2), ((1, 1), (1,))))


def test_qwen2_sliding_window_wider_than_every_sequence():
    """Sliding-window layers are exact while every sequence fits the window (and raise otherwise, below)."""
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0)
    check_equivalence(model, *make_groups())


@pytest.mark.skipif(KERNEL_MISSING, reason="rlloss.kernels.prefix_attention (the Triton kernel) is not there yet")
def test_packed_equals_separate_sequences_kernel_backend():
    """The same equivalence through the Triton kernels (interpreted on CPU): head_dim 64, one small case."""
    model = tiny_model("qwen2", hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                       num_hidden_layers=1)
    check_equivalence(model, *make_groups((5, 3), ((3, 2), (4,))), backend=KERNEL_BACKEND,
                      rtol=RTOL if INTERPRETED else 1e-4)  # GPU: other reduction orders


def test_fused_policy_loss_on_gathered_hidden_states():
    """The packed run's gathered hidden states in FusedPolicyLoss give the loss and every parameter gradient
    of the per-sequence run (hidden states of each [prompt | completion] stacked and padded)."""
    model = tiny_model("qwen2")
    prompts, completions = make_groups()
    batch = SharedPrefixBatch.pack(prompts, completions)
    C = batch.num_completions
    gen = torch.Generator().manual_seed(3)
    advantages = torch.randn(C, generator=gen)
    old_logprobs = -torch.rand(batch.mask.shape, generator=gen) * 4.0
    loss_fn = FusedPolicyLoss(LossConfig.preset("dapo"))

    def loss_of(hidden):  # [C, S_max, D]
        return loss_fn(hidden, model.lm_head.weight, batch.targets, batch.mask, advantages,
                       old_logprobs=old_logprobs).loss

    enable_shared_prefix(model, backend="torch")
    packed_hidden = model.model(**batch.model_inputs(), use_cache=False).last_hidden_state
    disable_shared_prefix(model)
    packed_loss = loss_of(batch.gather_hidden(packed_hidden))
    packed_loss.backward()
    packed_grads = grads(model)

    model.zero_grad(set_to_none=True)
    rows = []
    for prompt, completion in sequences(prompts, completions):
        P, S = prompt.numel(), completion.numel()
        hidden = model.model(input_ids=torch.cat([prompt, completion])[None], use_cache=False).last_hidden_state[0]
        rows.append(torch.nn.functional.pad(hidden[P - 1: P + S - 1], (0, 0, 0, batch.mask.shape[1] - S)))
    seq_loss = loss_of(torch.stack(rows))
    seq_loss.backward()

    assert_rel_close(packed_loss.detach(), seq_loss.detach(), RTOL, "loss")
    for name, grad in grads(model).items():
        assert_rel_close(packed_grads[name], grad, RTOL, f"grad of {name}")


# --- enabling, disabling, errors ---------------------------------------------------------------------------


def test_enable_disable_restores_the_previous_implementation():
    model = tiny_model("llama")
    original = model.config._attn_implementation
    assert enable_shared_prefix(model, backend="torch") is model
    assert model.config._attn_implementation == attention_implementation_name("torch")
    enable_shared_prefix(model, backend="reference")  # switching backends keeps the first original
    assert model.config._attn_implementation == attention_implementation_name("reference")
    assert disable_shared_prefix(model) is model
    assert model.config._attn_implementation == original
    disable_shared_prefix(model)  # not enabled: a no-op
    assert model.config._attn_implementation == original
    model.set_attn_implementation("eager")
    enable_shared_prefix(model)
    assert model.config._attn_implementation == attention_implementation_name(None)
    disable_shared_prefix(model)
    assert model.config._attn_implementation == "eager"


def test_layout_may_be_the_batch_itself():
    model = tiny_model("llama")
    batch = SharedPrefixBatch.pack(*make_groups())
    enable_shared_prefix(model, backend="torch")
    with torch.no_grad():
        a = model(input_ids=batch.input_ids, position_ids=batch.position_ids, shared_prefix=batch).logits
        b = model(**batch.model_inputs()).logits  # use_cache left on: a fresh cache changes nothing
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.fixture
def enabled_llama():
    model = enable_shared_prefix(tiny_model("llama"), backend="torch")
    return model, SharedPrefixBatch.pack(*make_groups())


def test_packed_stream_without_layout_is_an_error(enabled_llama):
    """Calls without a layout run the original attention, but a packed stream (restarting positions, no
    mask) without its layout would silently attend across completions: it raises."""
    model, batch = enabled_llama
    with pytest.raises(ValueError, match="position_ids that restart .* but no `shared_prefix=`"):
        model(input_ids=batch.input_ids, position_ids=batch.position_ids)
    with pytest.raises(ValueError, match="position_ids that restart"):
        model.model(input_ids=batch.input_ids, position_ids=batch.position_ids)


def test_batch_larger_than_one_is_an_error(enabled_llama):
    model, batch = enabled_llama
    with pytest.raises(ValueError, match=r"batch size 1.*\(2, 4, 31, 16\)"):
        model(input_ids=batch.input_ids.expand(2, -1), position_ids=batch.position_ids.expand(2, -1),
              shared_prefix=batch.layout)


def test_wrong_layout_or_positions_are_errors(enabled_llama):
    model, batch = enabled_llama
    with pytest.raises(ValueError, match="position_ids do not match the layout"):
        model(input_ids=batch.input_ids, shared_prefix=batch.layout)  # the model counts 0..T-1
    other = SharedPrefixBatch.pack(*make_groups((3,), ((2,),)))
    with pytest.raises(ValueError, match="layout describes 5 packed tokens but the model got 31"):
        model(input_ids=batch.input_ids, position_ids=batch.position_ids, shared_prefix=other.layout)
    with pytest.raises(TypeError, match="must be a rlloss.SharedPrefixLayout or SharedPrefixBatch, got list"):
        model(input_ids=batch.input_ids, position_ids=batch.position_ids, shared_prefix=[1])


def test_attention_mask_is_an_error(enabled_llama):
    model, batch = enabled_llama
    for forward in (model, model.model):
        with pytest.raises(ValueError, match="pass no attention_mask"):
            forward(**batch.model_inputs(), attention_mask=torch.ones_like(batch.input_ids))
    disable_shared_prefix(model)
    with torch.no_grad():  # the hooks are gone with it
        model(input_ids=batch.input_ids, attention_mask=torch.ones_like(batch.input_ids))


def test_sliding_window_narrower_than_a_sequence_is_an_error():
    model = enable_shared_prefix(tiny_model("mistral", sliding_window=8), backend="torch")
    batch = SharedPrefixBatch.pack(*make_groups())  # longest sequence: 7 + 6 = 13 tokens
    with pytest.raises(ValueError, match="sliding window of 8 tokens but a packed sequence .* has 13"):
        model(**batch.model_inputs())


def test_model_without_attention_interface_is_refused():
    config = transformers.BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=VOCAB)
    model = transformers.BloomForCausalLM(config)
    before = model.config._attn_implementation
    with pytest.raises(ValueError, match="BloomForCausalLM's attention modules do not go through transformers' "
                                         "AttentionInterface"):
        enable_shared_prefix(model)
    assert model.config._attn_implementation == before


def test_layers_that_are_not_attention_are_refused():
    model = tiny_model("llama")
    model.config.layer_types = ["full_attention", "linear_attention"]  # e.g. a hybrid with linear-attention layers
    with pytest.raises(ValueError, match=r"layers of type \['linear_attention'\]"):
        enable_shared_prefix(model)


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend='cuda' is not a backend"):
        enable_shared_prefix(tiny_model("llama"), backend="cuda")
    with pytest.raises(TypeError, match="transformers PreTrainedModel, got Linear"):
        enable_shared_prefix(torch.nn.Linear(2, 2))


def test_enabling_leaves_other_models_alone():
    model = tiny_model("llama")
    other = copy.deepcopy(model)
    enable_shared_prefix(model, backend="torch")
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        other(input_ids=ids)  # a plain padded-free batch of 2 still runs sdpa
    assert other.config._attn_implementation != model.config._attn_implementation


# --- no juggling: generation and ordinary batches while enabled; the switch is per model ---------------------


def generate(model, input_ids, attention_mask=None):
    with torch.no_grad():
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                              pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_generate_while_enabled_equals_generate_disabled(implementation):
    """model.generate (KV cache, left padding) runs the model's original attention and masks while shared-prefix
    attention stays enabled: the same greedy tokens; a packed forward right after still matches."""
    model = tiny_model("llama")
    model.set_attn_implementation(implementation)
    gen = torch.Generator().manual_seed(5)
    one = torch.randint(1, VOCAB, (1, 7), generator=gen)
    padded = torch.randint(1, VOCAB, (2, 6), generator=gen)
    padded[0, :2] = 0  # left padding
    mask = (torch.arange(6) >= torch.tensor([[2], [0]])).long()
    expected = generate(model, one), generate(model, padded, mask)
    batch = SharedPrefixBatch.pack(*make_groups())
    with torch.no_grad():
        reference = model(input_ids=torch.cat([make_groups()[0][0], make_groups()[1][0][0]])[None]).logits[0]

    enable_shared_prefix(model, backend="torch")
    assert torch.equal(generate(model, one), expected[0])
    assert torch.equal(generate(model, padded, mask), expected[1])
    with torch.no_grad():
        packed = model(**batch.model_inputs(), use_cache=False).logits[0]
        assert torch.equal(generate(model, one), expected[0])  # and again after a packed call
    torch.testing.assert_close(packed[:10], reference, rtol=1e-5, atol=1e-5)  # prompt 7 + completion 3
    assert model.config._attn_implementation == attention_implementation_name("torch")
    disable_shared_prefix(model)
    assert model.config._attn_implementation == implementation


def test_two_models_sharing_a_config():
    """Model(config) twice shares one config object: enabling one names the rlloss attention in both configs,
    yet the other keeps its own attention, refuses a layout until enabled itself, and the config is restored
    only when the last enabled model is disabled."""
    config = transformers.LlamaConfig(**TINY)
    torch.manual_seed(0)
    a = transformers.LlamaForCausalLM(config).eval()
    b = transformers.LlamaForCausalLM(config).eval()
    assert a.config is b.config
    batch = SharedPrefixBatch.pack(*make_groups())
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        b_plain = b(input_ids=ids).logits
        a_plain = a(input_ids=ids).logits

    enable_shared_prefix(a, backend="torch")
    assert shared_prefix_enabled(a) and not shared_prefix_enabled(b)
    assert b.config._attn_implementation == attention_implementation_name("torch")  # the shared config
    with torch.no_grad():
        torch.testing.assert_close(b(input_ids=ids).logits, b_plain, rtol=0, atol=0)
        torch.testing.assert_close(a(input_ids=ids).logits, a_plain, rtol=0, atol=0)
        a(**batch.model_inputs())
        with pytest.raises(ValueError, match="not enabled on its model.*enable_shared_prefix\\(model\\) on this"):
            b(**batch.model_inputs())
        assert b(input_ids=ids).logits.shape == (2, 5, VOCAB)  # the failed call left nothing behind
        assert integration._LAYOUT_CALLS.get() == ()

    enable_shared_prefix(b, backend="torch")
    disable_shared_prefix(a)  # b still uses the config: it keeps the rlloss name
    assert config._attn_implementation == attention_implementation_name("torch")
    with torch.no_grad():
        b(**batch.model_inputs())
        with pytest.raises(ValueError, match="not enabled on its model"):
            a(**batch.model_inputs())
        torch.testing.assert_close(a(input_ids=ids).logits, a_plain, rtol=0, atol=0)
    disable_shared_prefix(b)
    assert config._attn_implementation == "sdpa"


def test_backend_is_per_model(monkeypatch):
    config = transformers.LlamaConfig(**TINY)
    a, b = transformers.LlamaForCausalLM(config).eval(), transformers.LlamaForCausalLM(config).eval()
    enable_shared_prefix(a, backend="torch")
    enable_shared_prefix(b, backend="reference")
    seen = []
    original = integration.shared_prefix_attention

    def spy(*args, backend=None, **kwargs):
        seen.append(backend)
        return original(*args, backend=backend, **kwargs)

    monkeypatch.setattr(integration, "shared_prefix_attention", spy)
    batch = SharedPrefixBatch.pack(*make_groups())
    with torch.no_grad():
        a(**batch.model_inputs())
        assert set(seen) == {"torch"}
        seen.clear()
        b(**batch.model_inputs())
        assert set(seen) == {"reference"}
    disable_shared_prefix(a), disable_shared_prefix(b)


def test_shared_prefix_context_manager():
    model = tiny_model("llama")
    batch = SharedPrefixBatch.pack(*make_groups())
    with shared_prefix(model, backend="torch") as m:
        assert m is model and shared_prefix_enabled(model)
        with torch.no_grad():
            model(**batch.model_inputs())
    assert not shared_prefix_enabled(model) and model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="boom"):
        with shared_prefix(model):
            raise RuntimeError("boom")
    assert not shared_prefix_enabled(model) and model.config._attn_implementation == "sdpa"
    enable_shared_prefix(model, backend="reference")
    with shared_prefix(model, backend="torch"):  # already enabled: the block's backend, then the old one again
        assert getattr(model, integration._ENABLED).backend == "torch"
    assert shared_prefix_enabled(model) and getattr(model, integration._ENABLED).backend == "reference"
    disable_shared_prefix(model)


def test_deepcopy_of_an_enabled_model():
    """A reference model made by deepcopy (as TRL does) is enabled too, with its own config and hooks."""
    model = enable_shared_prefix(tiny_model("llama"), backend="torch")
    copy_ = copy.deepcopy(model)
    batch = SharedPrefixBatch.pack(*make_groups())
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        packed = model(**batch.model_inputs()).logits
        torch.testing.assert_close(copy_(**batch.model_inputs()).logits, packed, rtol=0, atol=0)
        plain = copy_(input_ids=ids).logits
    disable_shared_prefix(copy_)
    assert copy_.config._attn_implementation == "sdpa" and shared_prefix_enabled(model)
    with torch.no_grad():
        torch.testing.assert_close(copy_(input_ids=ids).logits, plain, rtol=0, atol=0)
        torch.testing.assert_close(model(**batch.model_inputs()).logits, packed, rtol=0, atol=0)
        with pytest.raises(ValueError, match="pass no attention_mask"):  # the original's hooks are intact
            model(**batch.model_inputs(), attention_mask=torch.ones_like(batch.input_ids))
    disable_shared_prefix(model)


def test_padded_fallback_equals_packed():
    """pack(..., packed=False) — what packed="auto" falls back to — runs through the same enabled model (its own
    attention with the padding mask) and gives the packed batch's log-probs and parameter gradients."""
    model = enable_shared_prefix(tiny_model("qwen2"), backend="torch")
    prompts, completions = make_groups()
    results = []
    for packed in (True, False):
        batch = SharedPrefixBatch.pack(prompts, completions, packed=packed)
        assert batch.packed == packed
        model.zero_grad(set_to_none=True)
        hidden = model.model(**batch.model_inputs(), use_cache=False).last_hidden_state
        logprobs = rlloss.token_logprobs(batch.gather_hidden(hidden), model.lm_head.weight, batch.targets).logprobs
        loss = (logprobs * token_weights(batch)).sum()
        loss.backward()
        results.append((logprobs.detach(), grads(model)))
    disable_shared_prefix(model)
    assert_rel_close(results[1][0], results[0][0], RTOL, "log-probs")
    for name, grad in results[1][1].items():
        assert_rel_close(grad, results[0][1][name], RTOL, f"grad of {name}")


def test_implementation_changed_after_enabling_is_an_error(enabled_llama):
    model, batch = enabled_llama
    model.set_attn_implementation("sdpa")  # sdpa would ignore the layout and attend across completions
    with pytest.raises(ValueError, match="attention implementation is now 'sdpa'.*enable_shared_prefix"):
        model(**batch.model_inputs())
    enable_shared_prefix(model, backend="torch")
    with torch.no_grad():
        model(**batch.model_inputs())
