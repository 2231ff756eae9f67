"""Shared-prefix training on more model families (issue #12 item 5): Phi-3, Gemma 2, Gemma 3 and a Qwen2.5-VL
prompt holding an image (tiny random configs, no downloads). Packed logits and every parameter gradient equal
running each sequence alone, or the call fails with an error that names the feature shared-prefix attention does
not support."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rlloss import SharedPrefixBatch  # noqa: E402
from rlloss.integrations import transformers as integration  # noqa: E402
from rlloss.integrations.transformers import enable_shared_prefix, shared_prefix  # noqa: E402
from test_integration_transformers import (  # noqa: E402
    TINY, VOCAB, assert_rel_close, check_equivalence, make_groups)

# Gemma's attention scale is 1/sqrt(query_pre_attn_scalar); windows wider than every test sequence (13 tokens).
GEMMA = dict(query_pre_attn_scalar=16, sliding_window=64)
FAMILIES = {
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0)),
    "gemma2_without_softcap": ("Gemma2Config", "Gemma2ForCausalLM",
                               dict(GEMMA, attn_logit_softcapping=None, final_logit_softcapping=None)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA),
}


def _model(config_name, model_name, **overrides):
    if not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**TINY, **overrides})
    return getattr(transformers, model_name)(config).float().eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_equals_separate_sequences(family):
    config_name, model_name, overrides = FAMILIES[family]
    check_equivalence(_model(config_name, model_name, **overrides), *make_groups())


def test_gemma2_attention_softcapping_is_named():
    """Gemma 2 soft-caps its attention logits (tanh before the softmax), which the shared-prefix kernels do not
    do: the call is refused with the feature's name instead of computing different attention."""
    model = enable_shared_prefix(_model("Gemma2Config", "Gemma2ForCausalLM", **GEMMA), backend="torch")
    batch = SharedPrefixBatch.pack(*make_groups())
    with pytest.raises(ValueError, match="attention logit soft-capping"):
        model(**batch.model_inputs())


def test_gemma3_sliding_window_narrower_than_a_sequence_is_named():
    model = enable_shared_prefix(_model("Gemma3TextConfig", "Gemma3ForCausalLM", query_pre_attn_scalar=16,
                                        sliding_window=8), backend="torch")
    batch = SharedPrefixBatch.pack(*make_groups())  # longest sequence: 7 + 6 = 13 tokens
    with pytest.raises(ValueError, match="sliding window of 8 tokens"):
        model(**batch.model_inputs())


# --- a multimodal prompt: Qwen2.5-VL with an image in the shared prompt ----------------------------------

IMAGE, VISION_START, VISION_END, VIDEO = VOCAB, VOCAB + 1, VOCAB + 2, VOCAB + 3
# A 1×4×4 grid of 4×4-pixel patches, merged 2×2: 4 image tokens in the prompt.
IMAGE_GRID = (1, 4, 4)


def _qwen2_5_vl():
    if not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
        pytest.skip(f"transformers {transformers.__version__} has no Qwen2_5_VLForConditionalGeneration")
    text = {**TINY, "vocab_size": VOCAB + 4,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TINY["hidden_size"],
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=8, fullatt_block_indexes=[0])
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                                           vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
                                           video_token_id=VIDEO)
    torch.manual_seed(0)
    return transformers.Qwen2_5_VLForConditionalGeneration(config).float().eval()


def _mrope(model, ids, grid):
    """Qwen2.5-VL's [3, 1, n] rotary positions of one sequence (image tokens on their 2-D grid)."""
    return model.model.get_rope_index(ids[None], (ids == IMAGE).int()[None], image_grid_thw=grid)[0]


def test_qwen2_5_vl_image_in_the_shared_prompt():
    """An image's placeholder tokens inside the shared prompt: the vision tower runs once on the packed stream,
    the language model (where shared-prefix attention is enabled) gets position ids [4, 1, T] — the layout's
    positions, then each sequence's 3-D rotary positions — and the logits and every parameter gradient,
    vision tower included, equal running each [prompt | completion] alone."""
    model = _qwen2_5_vl()
    n_image = IMAGE_GRID[0] * IMAGE_GRID[1] * IMAGE_GRID[2] // 4
    gen = torch.Generator().manual_seed(3)
    prompt = torch.cat([torch.randint(0, VOCAB, (3,), generator=gen), torch.tensor([VISION_START]),
                        torch.full((n_image,), IMAGE), torch.tensor([VISION_END]),
                        torch.randint(0, VOCAB, (2,), generator=gen)])
    completions = [torch.randint(0, VOCAB, (s,), generator=gen) for s in (4, 1, 6)]
    grid = torch.tensor([IMAGE_GRID])
    pixels = torch.randn(IMAGE_GRID[1] * IMAGE_GRID[2], 3 * 2 * 4 * 4, generator=gen)
    weights = [torch.randn(c.numel(), generator=gen) for c in completions]
    P = prompt.numel()

    def nll(logits, completion, w):  # logits of the positions that predict the completion
        return -(w * torch.log_softmax(logits, -1).gather(-1, completion[:, None]).squeeze(-1)).sum()

    model.zero_grad(set_to_none=True)
    separate, loss = [], 0.0
    for completion, w in zip(completions, weights):
        ids = torch.cat([prompt, completion])
        logits = model(input_ids=ids[None], pixel_values=pixels, image_grid_thw=grid,
                       mm_token_type_ids=(ids == IMAGE).int()[None], use_cache=False).logits[0]
        separate.append(logits)
        loss = loss + nll(logits[P - 1: -1], completion, w)
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    batch = SharedPrefixBatch.pack([prompt], [completions])
    rope = [_mrope(model, torch.cat([prompt, c]), grid) for c in completions]
    positions = torch.cat([batch.model_inputs()["position_ids"][None],
                           torch.cat([rope[0][..., :P]] + [r[..., P:] for r in rope], -1)])  # [4, 1, T]
    enable_shared_prefix(model.model.language_model, backend="torch")
    logits = model(input_ids=batch.input_ids, pixel_values=pixels, image_grid_thw=grid,
                   position_ids=positions, shared_prefix=batch.layout, use_cache=False).logits[0]
    gathered = batch.gather_hidden(logits)
    packed_loss = sum(nll(gathered[c, :n.numel()], n, w) for c, (n, w) in enumerate(zip(completions, weights)))
    packed_loss.backward()

    assert_rel_close(packed_loss.detach(), loss.detach(), 1e-5, "loss")
    stream = P
    assert_rel_close(logits[:P], separate[0][:P], 1e-5, "prompt logits")
    for completion, seq in zip(completions, separate):
        assert_rel_close(logits[stream: stream + completion.numel()], seq[P:], 1e-5, "completion logits")
        stream += completion.numel()
    for name, grad in expected.items():
        assert_rel_close(model.get_parameter(name).grad, grad, 1e-5, f"grad of {name}")


def test_deterministic_option_reaches_the_op(monkeypatch):
    """enable_shared_prefix(deterministic=False) (and the context manager) pass the option to every attention
    call; the default is the deterministic path, and a non-bool is refused naming the argument."""
    seen = []
    op = integration.shared_prefix_attention

    def spy(*args, deterministic, **kwargs):
        seen.append(deterministic)
        return op(*args, deterministic=deterministic, **kwargs)

    monkeypatch.setattr(integration, "shared_prefix_attention", spy)
    model = _model(*FAMILIES["phi3"][:2], **FAMILIES["phi3"][2])
    batch = SharedPrefixBatch.pack(*make_groups())
    with torch.no_grad():
        with shared_prefix(model, backend="torch", deterministic=False):
            model(**batch.model_inputs())
        assert seen == [False] * model.config.num_hidden_layers
        seen.clear()
        enable_shared_prefix(model, backend="torch")
        model(**batch.model_inputs())
        assert seen == [True] * model.config.num_hidden_layers
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        enable_shared_prefix(model, deterministic="no")
