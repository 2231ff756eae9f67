"""rlloss: fused Triton kernels for the losses of RL post-training of language models.

Public names are exported here and only here; see docs/ for the API and MATH.md-style formulas.
"""
from .advantages import group_advantages
from .logprobs import TokenLogprobs, logprobs_from_logits, token_logprobs
from .config import LossConfig
from .policy import FusedPolicyLoss, PolicyLossOutput, policy_loss

__version__ = "0.1.0"

__all__ = [
    "FusedPolicyLoss",
    "LossConfig",
    "PolicyLossOutput",
    "TokenLogprobs",
    "group_advantages",
    "logprobs_from_logits",
    "policy_loss",
    "token_logprobs",
]
