"""rlloss: fused Triton kernels for the losses of RL post-training of language models.

Public names are exported here and only here; see docs/ for the API and the formulas of docs/math.md.
"""
from .advantages import group_advantages
from .batching import PaddedBatch
from .logprobs import TokenLogprobs, logprobs_from_logits, token_logprobs
from .config import LossConfig
from .distributed import GlobalCounts, global_counts
from .policy import FusedPolicyLoss, PolicyLossOutput, fused_policy_loss, policy_loss
from . import credit, family, teacher
from .family import d3s_sample_mask, discounted_returns, gigpo_advantages, mc_grpo_keep_mask, pairwise_advantages
from .credit import LinearDecay, contrastive_credit
from .prefix_attention import SharedPrefixLayout, shared_prefix_attention
from .prefix_batch import SharedPrefixBatch

__version__ = "0.1.0"

__all__ = [
    "FusedPolicyLoss",
    "GlobalCounts",
    "LinearDecay",
    "LossConfig",
    "PaddedBatch",
    "PolicyLossOutput",
    "SharedPrefixBatch",
    "SharedPrefixLayout",
    "TokenLogprobs",
    "contrastive_credit",
    "credit",
    "global_counts",
    "d3s_sample_mask",
    "discounted_returns",
    "family",
    "fused_policy_loss",
    "teacher",
    "gigpo_advantages",
    "mc_grpo_keep_mask",
    "pairwise_advantages",
    "group_advantages",
    "logprobs_from_logits",
    "policy_loss",
    "shared_prefix_attention",
    "token_logprobs",
]
