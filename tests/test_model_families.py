"""Shared-prefix training on more model families (issue #12 item 5): Phi-3, Gemma 2 and Gemma 3 (tiny random
configs, no downloads). Packed logits and every parameter gradient equal running each sequence alone, or the
call fails with an error that names the feature shared-prefix attention does not support."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rlloss import SharedPrefixBatch  # noqa: E402
from rlloss.integrations.transformers import enable_shared_prefix  # noqa: E402
from test_integration_transformers import TINY, check_equivalence, make_groups  # noqa: E402

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
