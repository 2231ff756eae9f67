"""PaddedBatch: TRL's padded [prompt | completion] batch to the fused loss's inputs (tiny random models)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import rlloss  # noqa: E402
from rlloss import FusedPolicyLoss, LossConfig, PaddedBatch, token_logprobs  # noqa: E402

VOCAB = 64
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, initializer_range=0.1, pad_token_id=0)
PROMPT_LENGTHS = (5, 2, 7)      # left-padded to P = 7
COMPLETION_LENGTHS = (4, 6, 1)  # right-padded to C = 6


def tiny_model():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).float().eval()


def trl_batch(seed=1):
    """Left-padded prompts, right-padded completions with garbage ids on the padding (as after EOS)."""
    gen = torch.Generator().manual_seed(seed)
    B, P, C = len(PROMPT_LENGTHS), max(PROMPT_LENGTHS), max(COMPLETION_LENGTHS)
    prompt_ids = torch.randint(1, VOCAB, (B, P), generator=gen)
    completion_ids = torch.randint(1, VOCAB, (B, C), generator=gen)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    completion_mask = torch.zeros(B, C, dtype=torch.long)
    for b, (p, c) in enumerate(zip(PROMPT_LENGTHS, COMPLETION_LENGTHS)):
        prompt_mask[b, P - p:] = 1
        completion_mask[b, :c] = 1
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, 0)
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def reference_logprobs(model, prompt_ids, completion_ids, b):
    """Row b alone, unpadded, through the model's logits: log_softmax gathered at the completion tokens."""
    p, c = PROMPT_LENGTHS[b], COMPLETION_LENGTHS[b]
    prompt = prompt_ids[b, prompt_ids.shape[1] - p:]
    ids = torch.cat([prompt, completion_ids[b, :c]])[None]
    logits = model(input_ids=ids).logits[0, p - 1: p + c - 1]
    return torch.log_softmax(logits.double(), -1).gather(1, completion_ids[b, :c, None]).squeeze(1)


def test_fields():
    prompt_ids, prompt_mask, completion_ids, completion_mask = trl_batch()
    batch = PaddedBatch.from_trl(prompt_ids, prompt_mask, completion_ids, completion_mask)
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.position_ids.shape == (3, 13)
    assert batch.prompt_length == 7 and batch.completion_length == 6
    assert torch.equal(batch.mask, completion_mask.bool())
    assert torch.equal(batch.targets, completion_ids.masked_fill(completion_mask == 0, -100))
    # each row's first real token at position 0, positions counting real tokens only
    assert batch.position_ids[1].tolist() == [0] * 5 + [0, 1] + [2, 3, 4, 5, 6, 7]
    hidden = torch.randn(3, 13, 5)
    assert torch.equal(batch.gather_hidden(hidden), hidden[:, 6:12])


def test_logprobs_equal_model_logits_with_padding():
    """token_logprobs(gathered hidden, lm_head.weight, targets) = log_softmax(logits) at the completion tokens of
    each unpadded row alone — left-padded prompts, ragged completions."""
    model = tiny_model()
    prompt_ids, prompt_mask, completion_ids, completion_mask = trl_batch()
    batch = PaddedBatch.from_trl(prompt_ids, prompt_mask, completion_ids, completion_mask)
    with torch.no_grad():
        hidden = model.model(**batch.model_inputs()).last_hidden_state
        logp = token_logprobs(batch.gather_hidden(hidden), model.lm_head.weight, batch.targets).logprobs
        padded_logits = model(**batch.model_inputs()).logits
    assert logp.shape == (3, 6)
    assert torch.all(logp[~batch.mask] == 0)
    P, C = batch.prompt_length, batch.completion_length
    padded = torch.log_softmax(padded_logits[:, P - 1: P + C - 1].double(), -1)
    for b in range(3):
        c = COMPLETION_LENGTHS[b]
        with torch.no_grad():
            alone = reference_logprobs(model, prompt_ids, completion_ids, b)
        torch.testing.assert_close(logp[b, :c].double(), alone, rtol=0, atol=2e-5)
        same_call = padded[b, :c].gather(1, completion_ids[b, :c, None]).squeeze(1)
        torch.testing.assert_close(logp[b, :c].double(), same_call, rtol=0, atol=2e-5)


def test_fused_loss_gradient_matches_logits_path():
    """FusedPolicyLoss on the gathered hidden states gives the loss and parameter gradients of the same policy
    loss on log_softmax(model logits)."""
    model = tiny_model()
    batch = PaddedBatch.from_trl(*trl_batch())
    gen = torch.Generator().manual_seed(2)
    advantages = torch.randn(3, generator=gen)
    old = (-torch.rand(batch.mask.shape, generator=gen) * 4).masked_fill(~batch.mask, 0)
    config = LossConfig.preset("dapo")

    hidden = model.model(**batch.model_inputs()).last_hidden_state
    fused = FusedPolicyLoss(config)(batch.gather_hidden(hidden), model.lm_head.weight, batch.targets, batch.mask,
                                    advantages, old_logprobs=old).loss
    fused.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    logits = batch.gather_hidden(model(**batch.model_inputs()).logits)
    logp = torch.log_softmax(logits, -1).gather(2, batch.targets.clamp(min=0)[..., None]).squeeze(2)
    naive = rlloss.policy_loss(logp, old, advantages, batch.mask, config=config).loss
    naive.backward()
    torch.testing.assert_close(fused, naive, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bool_masks_accepted():
    prompt_ids, prompt_mask, completion_ids, completion_mask = trl_batch()
    a = PaddedBatch.from_trl(prompt_ids, prompt_mask, completion_ids, completion_mask)
    b = PaddedBatch.from_trl(prompt_ids, prompt_mask.bool(), completion_ids, completion_mask.bool())
    assert torch.equal(a.attention_mask, b.attention_mask) and torch.equal(a.targets, b.targets)


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.update(prompt_ids=a["prompt_ids"].int()), TypeError, "prompt_ids must be int64"),
    (lambda a: a.update(completion_ids=[1, 2]), TypeError, "completion_ids must be a torch.Tensor"),
    (lambda a: a.update(prompt_ids=a["prompt_ids"][0]), ValueError, "prompt_ids must be 2-D"),
    (lambda a: a.update(completion_ids=a["completion_ids"][:2], completion_mask=a["completion_mask"][:2]),
     ValueError, "same batch size"),
    (lambda a: a.update(prompt_mask=a["prompt_mask"][:, 1:]), ValueError, "prompt_mask must have prompt_ids's shape"),
    (lambda a: a.update(completion_mask=a["completion_mask"].float()), TypeError, "completion_mask must be bool"),
    (lambda a: a.update(completion_mask=a["completion_mask"] * 2), ValueError, "completion_mask must hold only 0"),
    (lambda a: a.update(prompt_mask=a["prompt_mask"].flip(1)), ValueError, r"prompt_mask\[:, -1\] must be all 1"),
    (lambda a: a.update(completion_ids=a["completion_ids"][:, :0], completion_mask=a["completion_mask"][:, :0]),
     ValueError, "C = 0"),
])
def test_bad_inputs(change, error, match):
    args = dict(zip(("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"), trl_batch()))
    change(args)
    with pytest.raises(error, match=match):
        PaddedBatch.from_trl(**args)


def test_gather_hidden_bad_shape():
    batch = PaddedBatch.from_trl(*trl_batch())
    with pytest.raises(ValueError, match=r"hidden must be \[B, P \+ C, ...\] = \[3, 13, ...\]"):
        batch.gather_hidden(torch.randn(3, 12, 4))
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor"):
        batch.gather_hidden(None)
