"""rlloss inside verl 0.9.1: registered policy losses and advantage estimators, and an actor patch.

Importing this module registers the policy losses ``rlloss_<mode>`` (:data:`VERL_POLICY_LOSSES`, each verl's
``<mode>`` policy term by :func:`rlloss.policy_loss`) and the advantage estimators ``rlloss_<estimator>``
(:data:`VERL_ADVANTAGE_ESTIMATORS`, by :func:`rlloss.group_advantages`) in verl's own registries, so that
``actor_rollout_ref.model.external_lib=rlloss.integrations.verl`` is all a run needs. :func:`patch_engine` makes
verl's FSDP actor engine compute the log-probs and entropy from the hidden states, never the logits;
:func:`patch_engine_class`, or ``RLLOSS_VERL_PATCH_ENGINE=1`` at import, does it for every engine of the process.

Set-up, the options honoured and refused, metrics and parity: docs/integrations.md; tests/test_integration_verl.py.
"""
from __future__ import annotations

import os
import types
import warnings
from contextlib import nullcontext
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..advantages import group_advantages
from ..config import LossConfig
from ..logprobs import token_logprobs
from ..policy import policy_loss

try:  # verl is an optional dependency: see docs/integrations.md for its install line
    import verl
    from verl.trainer.ppo import core_algos
    from verl.utils import tensordict_utils as tu
except ImportError as error:  # pragma: no cover - exercised only without verl
    raise ImportError('rlloss.integrations.verl needs verl 0.9.1: pip install --no-deps "verl==0.9.1" and '
                      'pip install "rlloss[verl]" for its imports') from error

TESTED_VERL = "0.9.1"  # the engine patch follows this version's FSDPEngineWithLMHead.forward_step
if verl.__version__ != TESTED_VERL:
    warnings.warn(f"rlloss.integrations.verl is tested with verl {TESTED_VERL}, found {verl.__version__}",
                  stacklevel=2)

__all__ = ["VERL_POLICY_LOSSES", "VERL_ADVANTAGE_ESTIMATORS", "NOT_IN_RLLOSS", "loss_config_from_verl",
           "batch_counts_from_verl", "patch_engine", "patch_engine_class"]

PREFIX = "rlloss_"
# verl policy_loss.loss_mode → the rlloss preset of the same policy term (docs/presets.md). The one table to extend.
VERL_POLICY_LOSSES = {
    "vanilla": "verl_grpo",  # clipped surrogate with dual clip, log-ratio clamp ±20
    "gspo": "verl_gspo",     # GSPO-token, log-ratio clamp ≤ 10
    "sapo": "verl_sapo",     # soft gate; the policy term forced to seq-mean-token-mean
    "cispo": "verl_cispo",   # sg(clip(ρ))·A·ℓ
    "gpg": "gpg",            # −A·ℓ
    "geo_mean": "verl_geo_mean",  # GMPO: −Ā·exp(mean of the sign-clipped log-ratio), a mean over the local rows
    "clip_cov": "verl_clip_cov",  # ppo_clip, the gradient of a few random high-covariance tokens dropped
    "kl_cov": "verl_kl_cov",      # −A·ρ + ppo_kl_coef·|ℓ − ℓ°| on the highest-covariance tokens
    "dppo_tv": "verl_dppo_tv",    # −A·sg(min(ρ, clip_ratio_c))·ℓ inside the TV trust region
    "dppo_kl": "verl_dppo_kl",    # the same inside the binary-KL trust region
    "dro": "verl_dro",            # −(A·ℓ − ½·dro_beta·(ℓ − ℓ°)²)
}
# verl algorithm.adv_estimator → the group_advantages mode (grpo: "no_std" with norm_adv_by_std_in_grpo=False).
VERL_ADVANTAGE_ESTIMATORS = {
    "grpo": "grpo", "rloo": "rloo", "gpg": "gpg", "opo": "opo", "grpo_passk": "grpo_passk",
    "reinforce_plus_plus": "reinforce_plus_plus", "reinforce_plus_plus_baseline": "reinforce_plus_plus_baseline",
    "remax": "remax",
}
# verl names that rlloss does not compute: refused by name, never approximated (why: docs/integrations.md).
NOT_IN_RLLOSS = ("bypass_mode",)
_STD_FREE = {"grpo": "no_std", "grpo_passk": "grpo_passk_no_std"}
# group_advantages modes with verl's rule for a group of one (mean 0, std 1).
_VERL_SINGLETON = ("grpo", "no_std", "rloo", "gpg", "opo", "reinforce_plus_plus_baseline")
# Estimators of verl that use the token-level returns: rlloss takes one outcome reward per completion.
_OUTCOME_ONLY = ("reinforce_plus_plus", "remax")
# verl's clip fractions have rlloss's meaning for these losses only, actor/ppo_kl (the mean of ℓ° − ℓ) for every
# loss with a ratio but kl_cov (the mean of |ℓ − ℓ°| there): what the others log is in docs/integrations.md.
_SAME_CLIP_METRICS = ("vanilla", "gspo")
_WITHOUT_PPO_KL = ("gpg", "kl_cov")


def _get(config: Any, name: str, default: Any = None) -> Any:
    """A field of a verl dataclass config or of an omegaconf DictConfig."""
    value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
    return default if value is None else value


def _verl_mode(loss_mode: str) -> str:
    mode = loss_mode.removeprefix(PREFIX)
    if mode not in VERL_POLICY_LOSSES:
        why = f": rlloss does not compute verl's {mode!r} loss" if mode in NOT_IN_RLLOSS else (
            " is not a verl policy loss rlloss knows")
        raise ValueError(f"policy_loss.loss_mode={loss_mode!r}{why}; supported: {', '.join(VERL_POLICY_LOSSES)} "
                         f"(registered as {PREFIX}<name>)")
    return mode


def loss_config_from_verl(actor_config: Any, *, loss_mode: Optional[str] = None,
                          loss_agg_mode: Optional[str] = None, response_length: Optional[int] = None) -> LossConfig:
    """The :class:`rlloss.LossConfig` of the actor loss a verl ``ActorConfig`` asks for.

    The loss of verl 0.9.1's ``ppo_loss``: the policy term of ``policy_loss.loss_mode`` (a key of
    :data:`VERL_POLICY_LOSSES`, or its registered ``rlloss_`` name), plus ``kl_loss_coef``·KL (``kl_loss_type``)
    when ``use_kl_loss``, minus ``entropy_coeff``·H, each aggregated by ``loss_agg_mode`` (SAPO's policy term by
    seq-mean-token-mean and geo_mean's by a mean over the rows, as verl). The options honoured are listed in
    docs/integrations.md (verl); verl's rollout correction is applied by its trainer before the loss, so it is no
    part of this config: pass ``rollout_is_weights`` as ``rollout_weights``. The global counts come from
    :func:`batch_counts_from_verl`.

    Args:
        actor_config: verl's ``ActorConfig`` (or an omegaconf ``DictConfig`` with its fields).
        loss_mode: overrides ``actor_config.policy_loss.loss_mode``.
        loss_agg_mode: overrides ``actor_config.loss_agg_mode``.
        response_length: the padded response length, verl's ``loss_scale_factor`` when that is None; needed by
            ``seq-mean-token-sum-norm`` only.

    Raises:
        ValueError: naming a verl loss rlloss does not compute (:data:`NOT_IN_RLLOSS`), ``kl_loss_type="full"``,
            an unknown ``loss_agg_mode``, ``seq-mean-token-sum-norm`` without a length, or ``dro`` without a
            positive ``policy_loss.dro_beta``.
    """
    policy = _get(actor_config, "policy_loss", {})
    mode = _verl_mode(loss_mode or _get(policy, "loss_mode", "vanilla"))
    agg_name = loss_agg_mode or _get(actor_config, "loss_agg_mode", "token-mean")
    aggregation = agg_name.replace("-", "_")
    if aggregation not in ("token_mean", "token_sum", "seq_mean_token_sum", "seq_mean_token_mean",
                           "seq_mean_token_sum_norm"):
        raise ValueError(f"loss_agg_mode={agg_name!r} is not one of verl's aggregation modes")
    clip = _get(actor_config, "clip_ratio", 0.2)
    fields: Dict[str, Any] = dict(epsilon_low=_get(actor_config, "clip_ratio_low", clip),
                                  epsilon_high=_get(actor_config, "clip_ratio_high", clip),
                                  aggregation=aggregation, kl_aggregation=aggregation,
                                  entropy_aggregation=aggregation)
    if mode == "vanilla":
        fields["dual_clip"] = _get(actor_config, "clip_ratio_c", 3.0)
    if mode == "sapo":
        fields.update(aggregation="seq_mean_token_mean", sapo_tau_pos=_get(actor_config, "tau_pos", 1.0),
                      sapo_tau_neg=_get(actor_config, "tau_neg", 1.05))
    if mode == "geo_mean":  # verl: torch.mean over the rows whatever loss_agg_mode (batch_counts_from_verl)
        fields["aggregation"] = "seq_mean_token_mean"
    if mode == "clip_cov":  # verl's defaults when a field is None, as its compute_policy_loss_clip_cov
        fields.update(clip_cov_ratio=float(_get(policy, "clip_cov_ratio", 0.0002)),
                      clip_cov_lb=float(_get(policy, "clip_cov_lb", 1.0)),
                      clip_cov_ub=float(_get(policy, "clip_cov_ub", 5.0)))
    if mode == "kl_cov":
        fields.update(kl_cov_ratio=float(_get(policy, "kl_cov_ratio", 0.0002)),
                      kl_cov_coef=float(_get(policy, "ppo_kl_coef", 1.0)))
    if mode in ("dppo_tv", "dppo_kl"):
        fields["dppo_ratio_cap"] = float(_get(actor_config, "clip_ratio_c", 20.0))
    if mode == "dro":
        beta = _get(policy, "dro_beta")
        if beta is None or float(beta) <= 0:
            raise ValueError(f"policy_loss.dro_beta must be a positive value for loss_mode='dro', got {beta!r}")
        fields["dro_beta"] = float(beta)
    if agg_name == "seq-mean-token-sum-norm":
        length = _get(actor_config, "loss_scale_factor", response_length)
        if length is None:
            raise ValueError("loss_agg_mode='seq-mean-token-sum-norm' needs loss_scale_factor or response_length")
        fields["max_completion_length"] = int(length)
    info = _get(actor_config, "global_batch_info", {})
    fields["dp_size"] = int(_get(info, "dp_size", 1))
    if _get(actor_config, "use_kl_loss", False):
        kl_type = _get(actor_config, "kl_loss_type", "low_var_kl")
        if kl_type == "full":
            raise ValueError("kl_loss_type='full' needs every vocabulary entry's log-prob; rlloss has the "
                             "sampled-token estimators only (verl does not implement it either)")
        fields.update(beta=float(_get(actor_config, "kl_loss_coef", 0.001)), kl_estimator=kl_type, kl_clamp=True)
    else:
        fields["beta"] = 0.0
    fields["entropy_coef"] = float(_get(actor_config, "entropy_coeff", 0.0))
    return LossConfig.preset(VERL_POLICY_LOSSES[mode], **fields)


def batch_counts_from_verl(actor_config: Any, response_mask: Tensor, *,
                           loss_mode: Optional[str] = None) -> Dict[str, Any]:
    """``num_items_in_batch`` and ``num_sequences_in_batch`` for :func:`rlloss.policy_loss` from verl's
    ``global_batch_info`` (``dp_size``, ``batch_num_tokens``, ``global_batch_size``).

    verl divides by the global count and multiplies by ``dp_size``; rlloss divides by the global count over
    ``dp_size``. Without global counts (``dp_size`` 1), verl counts the micro-batch's tokens and its sequences
    with at least one token, and so does this. verl's geo_mean (``loss_mode``, by default
    ``policy_loss.loss_mode``) averages its policy term over the micro-batch's rows, empty ones included, whatever
    the global counts: its sequence count is the local row count.

    Raises:
        ValueError: a global count missing while ``dp_size`` > 1 (as verl's ``agg_loss``); geo_mean with an
            active KL or entropy term aggregated by a ``seq-mean-*`` mode over another sequence count (one
            rlloss call has one sequence count).
    """
    counts = _batch_counts(actor_config, response_mask)
    mode = _verl_mode(loss_mode or _get(_get(actor_config, "policy_loss", {}), "loss_mode", "vanilla"))
    if mode == "geo_mean":
        rows = float(response_mask.shape[0])
        terms = _get(actor_config, "use_kl_loss", False) or float(_get(actor_config, "entropy_coeff", 0.0)) != 0.0
        agg = _get(actor_config, "loss_agg_mode", "token-mean")
        if terms and agg.startswith("seq-mean") and counts["num_sequences_in_batch"] != rows:
            raise ValueError(f"loss_mode='geo_mean' averages over the {int(rows)} local rows, but the KL / entropy "
                             f"terms with loss_agg_mode={agg!r} over {counts['num_sequences_in_batch']} sequences; "
                             "compute the policy term and those terms in separate calls")
        counts["num_sequences_in_batch"] = rows
    return counts


def _batch_counts(actor_config: Any, response_mask: Tensor) -> Dict[str, Any]:
    info = _get(actor_config, "global_batch_info", {})
    dp = int(_get(info, "dp_size", 1))
    tokens, sequences = _get(info, "batch_num_tokens"), _get(info, "global_batch_size")
    if dp > 1 and (tokens is None or sequences is None):
        raise ValueError("global_batch_info needs batch_num_tokens and global_batch_size when dp_size > 1")
    mask = response_mask.bool()
    if sequences is None:
        sequences = max(int(mask.any(-1).sum()), 1)
    return dict(num_items_in_batch=None if tokens is None else float(tokens) / dp,
                num_sequences_in_batch=float(sequences) / dp)


def _metric_names(mode: str) -> Dict[str, str]:
    """verl metric name → rlloss metric of the same meaning (the rollout weights change neither)."""
    if mode in _WITHOUT_PPO_KL:
        return {}
    names = {"actor/ppo_kl": "ppo_kl"}
    if mode in _SAME_CLIP_METRICS:
        names.update({"actor/pg_clipfrac": "clip_ratio/region_mean",
                      "actor/pg_clipfrac_lower": "clip_ratio/dual_mean"})
    return names


def _policy_loss_fn(mode: str):
    def loss_fn(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                loss_agg_mode: str = "token-mean", config: Any = None,
                rollout_is_weights: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, float]]:
        if config is None:
            raise ValueError(f"{PREFIX}{mode} needs the actor config (config=None)")
        loss_config = loss_config_from_verl(config, loss_mode=mode, loss_agg_mode=loss_agg_mode,
                                            response_length=response_mask.shape[-1])
        # verl's ppo_loss adds the KL and entropy terms itself.
        loss_config = loss_config.replace(beta=0.0, entropy_coef=0.0)
        counts = _batch_counts(config, response_mask)
        if mode == "geo_mean":  # verl: torch.mean over the local rows
            counts["num_sequences_in_batch"] = float(response_mask.shape[0])
        # verl multiplies each token's policy term by its rollout weight (geo_mean: the sequence's geometric
        # mean of them); rlloss's rollout_weights do the same, where folding w into A would change geo_mean's
        # Ā, the clip_cov / kl_cov rankings and the terms not proportional to A (kl_cov, dro).
        weights = None if rollout_is_weights is None else rollout_is_weights.detach()
        out = policy_loss(log_prob, old_log_prob, advantages, response_mask.bool(), config=loss_config,
                          rollout_weights=weights, **counts)
        names = _metric_names(mode)
        return out.loss, {name: out.metrics[key].item() for name, key in names.items()}

    loss_fn.__name__ = f"{PREFIX}{mode}"
    loss_fn.__doc__ = (f"verl's {mode!r} policy term computed by rlloss.policy_loss (registered as "
                       f"{PREFIX}{mode}; see loss_config_from_verl).")
    return loss_fn


def _groups(index: Any, batch: int) -> Tuple[Tensor, Tensor]:
    """(order, sizes): the permutation that makes verl's groups (equal ``index`` values) consecutive, stably."""
    if index is None:
        raise ValueError("this advantage estimator needs verl's group index (the 'uid' of each completion)")
    _, inverse = np.unique(np.asarray(index), return_inverse=True)
    if inverse.shape[0] != batch:
        raise ValueError(f"index has {inverse.shape[0]} entries for {batch} completions")
    inverse = torch.from_numpy(inverse.reshape(-1))
    return torch.argsort(inverse, stable=True), torch.bincount(inverse)


def _check_outcome(name: str, token_level_rewards: Tensor, response_mask: Tensor) -> None:
    """Rewards must sit on the last counted token (one outcome reward per completion)."""
    mask = response_mask.bool()
    position = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(mask, position, -1).amax(-1, keepdim=True)
    if bool((token_level_rewards.ne(0) & (position != last)).any()):
        raise ValueError(f"{name} takes outcome rewards (one per completion, on its last counted token); "
                         "token_level_rewards holds others")


def _advantage_fn(estimator: str):
    def estimate(token_level_rewards: Tensor, response_mask: Tensor, index: Any = None, config: Any = None,
                 reward_baselines: Optional[Tensor] = None, **_: Any) -> Tuple[Tensor, Tensor]:
        name = f"{PREFIX}{estimator}"
        mode = VERL_ADVANTAGE_ESTIMATORS[estimator]
        if config is not None and not _get(config, "norm_adv_by_std_in_grpo", True):
            mode = _STD_FREE.get(mode, mode)
        if mode == "reinforce_plus_plus" and config is not None and float(_get(config, "gamma", 1.0)) != 1.0:
            raise ValueError(f"{name} computes gamma=1 only, got algorithm.gamma={config.gamma}")
        if mode in _OUTCOME_ONLY:
            _check_outcome(name, token_level_rewards, response_mask)
        with torch.no_grad():
            scores = token_level_rewards.sum(-1)
            order, sizes = torch.arange(scores.shape[0]), None  # the outcome-only estimators have no groups
            if mode not in _OUTCOME_ONLY:
                order, sizes = _groups(index, scores.shape[0])
                if mode.startswith("grpo_passk") and bool((sizes < 2).any()):
                    raise ValueError(f"{name} needs at least 2 completions per group (as verl's grpo_passk)")
            order = order.to(scores.device)
            kwargs: Dict[str, Any] = dict(mode=mode, group_sizes=sizes)
            if mode in _VERL_SINGLETON:
                kwargs["singleton"] = "verl"
            if mode in ("opo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"):
                kwargs["response_lengths"] = response_mask.sum(-1)[order]
            if mode == "remax":
                if reward_baselines is None:
                    raise ValueError(f"{name} needs reward_baselines (the greedy completion's reward)")
                kwargs["baselines"] = reward_baselines
            values = group_advantages(scores[order], **kwargs)
            values = torch.empty_like(values).index_copy_(0, order, values)
            advantages = values.to(scores.dtype).unsqueeze(-1) * response_mask
            if mode in _OUTCOME_ONLY:  # verl's returns: the reward-to-go of the counted tokens
                returns = (token_level_rewards * response_mask).flip(-1).cumsum(-1).flip(-1)
                return advantages, returns * response_mask if mode == "reinforce_plus_plus" else returns
        return advantages, advantages

    estimate.__name__ = f"{PREFIX}{estimator}"
    estimate.__doc__ = f"verl's {estimator!r} advantage computed by rlloss.group_advantages."
    return estimate


def _register() -> None:
    for mode in VERL_POLICY_LOSSES:
        core_algos.register_policy_loss(PREFIX + mode)(_policy_loss_fn(mode))
    for estimator in VERL_ADVANTAGE_ESTIMATORS:
        if PREFIX + estimator not in core_algos.ADV_ESTIMATOR_REGISTRY:  # a re-import keeps the first registration
            core_algos.register_adv_est(PREFIX + estimator)(_advantage_fn(estimator))


_register()


# --- the actor engine: log-probs and entropy from hidden states ---------------------------------------------


def _engine_module():
    from verl.workers.engine.fsdp import transformer_impl  # imports FSDP / peft: only when patching
    return transformer_impl


def _inner_model(module: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under FSDP1 and PEFT wrappers (FSDP2 keeps the model itself)."""
    while True:
        if hasattr(module, "_fsdp_wrapped_module"):
            module = module._fsdp_wrapped_module
        elif hasattr(module, "get_base_model") and hasattr(module, "peft_config"):
            module = module.get_base_model()
        else:
            return module


def _install_logprob_forward(model: torch.nn.Module) -> None:
    """Let ``model(..., rlloss_targets=y)`` return (log-probs, entropy or None) [N] of the packed tokens.

    Computed inside the model's forward, so that FSDP has the lm_head gathered; any other call runs the forward the
    model had before."""
    if getattr(model, "_rlloss_logprob_forward", False):
        return
    text_config = model.config.get_text_config()
    scales = [name for name in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
              if getattr(text_config, name, None) not in (None, 1, 1.0)]
    if scales:
        raise ValueError(f"rlloss's verl actor patch cannot apply the model's logit scaling ({', '.join(scales)})")
    softcap = getattr(text_config, "final_logit_softcapping", None)
    previous = model.forward

    def forward(self, *args, rlloss_targets=None, rlloss_temperature=1.0, rlloss_entropy=False, **kwargs):
        if rlloss_targets is None:
            return previous(*args, **kwargs)
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])
        head = self.get_output_embeddings()
        weight, bias = head.weight.to(hidden.dtype), head.bias
        temperature = rlloss_temperature
        if isinstance(temperature, Tensor):  # per-token T: z/T = (h/T)·Wᵀ without a bias or a soft-cap
            if bias is not None or softcap is not None:
                raise ValueError("rlloss's verl actor patch takes a per-sample temperature only for an lm_head "
                                 "without bias and a model without final_logit_softcapping")
            hidden, temperature = hidden / temperature.to(hidden.dtype).unsqueeze(-1), 1.0
        with torch.autocast(hidden.device.type, enabled=False):
            out = token_logprobs(hidden, weight, rlloss_targets, bias=None if bias is None else bias.to(hidden.dtype),
                                 temperature=float(temperature), softcap=softcap, return_entropy=rlloss_entropy)
        return out.logprobs, out.entropy

    model.forward = types.MethodType(forward, model)
    model._rlloss_logprob_forward = True


def _refused(engine, micro_batch) -> list:
    """The options of this micro-batch the patched forward cannot honour, each named."""
    refused = []
    if getattr(engine, "use_ulysses_sp", False):
        refused.append("ulysses_sequence_parallel_size > 1")
    if not tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
        refused.append("use_remove_padding=False (the patch takes the remove-padding layout)")
    for key, why in (("use_fused_kernels", "verl's own fused log-prob kernels"),
                     ("calculate_sum_pi_squared", "needs the full logits"),
                     ("distillation_use_topk", "needs the full logits"),
                     ("distillation_only", "no log-probs to compute")):
        if tu.get_non_tensor_data(data=micro_batch, key=key, default=False):
            refused.append(f"{key}=True ({why})")
    if len(micro_batch.get("multi_modal_inputs", [])):
        refused.append("multimodal inputs (multi_modal_inputs)")
    return refused


def _forward_step(self, micro_batch, loss_function, forward_only):
    """verl 0.9.1 ``FSDPEngineWithLMHead.forward_step`` with the log-probs and entropy from rlloss."""
    _install_logprob_forward(_inner_model(self.module))  # the module is built after the engine (initialize)
    impl = _engine_module()
    refused = _refused(self, micro_batch)
    if refused:
        raise ValueError("rlloss's verl actor patch cannot honour: " + "; ".join(refused))
    micro_batch = micro_batch.to(impl.get_device_id())
    model_inputs, output_args = self.prepare_model_inputs(micro_batch=micro_batch)  # verl's packing
    temperature = micro_batch["temperature"]
    if isinstance(temperature, Tensor):
        temperature = output_args["temperature_rmpad"]
    calculate_entropy = tu.get_non_tensor_data(data=micro_batch, key="calculate_entropy", default=False)
    autocast_dtype = getattr(self, "_autocast_dtype", torch.bfloat16)
    autocast_ctx = (nullcontext() if autocast_dtype == torch.float32
                    else torch.autocast(device_type=impl.get_device_name(), dtype=autocast_dtype))
    with autocast_ctx:
        log_probs, entropy = self.module(**model_inputs, use_cache=False,
                                         rlloss_targets=output_args["input_ids_rmpad_rolled"],
                                         rlloss_temperature=temperature, rlloss_entropy=calculate_entropy)
        cu_seqlens, pad = micro_batch["input_ids"].offsets(), output_args["pad_size"]
        per_token = dict(log_probs=log_probs, entropy=entropy) if calculate_entropy else dict(log_probs=log_probs)
        model_output = {key: torch.nested.nested_tensor_from_jagged(self._gather_and_unpad_packed(x, pad), cu_seqlens)
                        for key, x in per_token.items()}
        if loss_function is not None:
            loss, metrics = loss_function(model_output=model_output, data=micro_batch,
                                          dp_group=self.get_data_parallel_group())
        else:
            assert forward_only, "forward_only must be True when loss_function is None"
            loss, metrics = torch.tensor(1.0, device=log_probs.device), {}
        output = {"model_output": impl.detach_tree(model_output), "loss": loss.detach().item(), "metrics": metrics}
    return loss, output


def patch_engine(engine: Any) -> Any:
    """Make one verl ``FSDPEngineWithLMHead`` (actor or reference) compute log-probs and entropy with
    :func:`rlloss.token_logprobs` from the last hidden states and the lm_head weight (in place; returns it).

    Everything else is verl's: the packing of the micro-batch (``prepare_model_inputs``), the loss function
    (``ppo_loss``, with a registered ``rlloss_`` policy loss or verl's own), the backward and the optimizer. The
    per-token log-probs and entropies equal the stock engine's (tests/test_integration_verl.py).

    Raises:
        TypeError: for anything but an ``FSDPEngineWithLMHead`` (a value-head or other subclass).
        ValueError: at patch time for a model with a logit scale (``logit_scale`` …); in the forward, naming them,
            for options the patch cannot honour: Ulysses sequence parallelism, ``use_remove_padding=False``,
            ``use_fused_kernels``, ``calculate_sum_pi_squared``, top-K distillation, multimodal inputs, and a
            per-sample temperature with an lm_head bias or a logit soft-cap.
    """
    stock = _engine_module().FSDPEngineWithLMHead
    if not isinstance(engine, stock) or type(engine).prepare_model_outputs is not stock.prepare_model_outputs:
        raise TypeError(f"rlloss's verl actor patch takes verl's FSDPEngineWithLMHead (the actor / reference "
                        f"engine), got {type(engine).__name__}")
    if getattr(engine, "module", None) is not None:  # else installed at the first step (built by initialize())
        _install_logprob_forward(_inner_model(engine.module))
    engine.forward_step = types.MethodType(_forward_step, engine)
    return engine


def patch_engine_class() -> None:
    """Patch ``FSDPEngineWithLMHead.forward_step`` for every engine of the process, as :func:`patch_engine`
    (subclasses that process the outputs otherwise, e.g. the critic's value head, keep verl's forward)."""
    impl = _engine_module()
    stock = impl.FSDPEngineWithLMHead.forward_step
    if getattr(stock, "_rlloss", False):
        return

    def forward_step(self, micro_batch, loss_function, forward_only):
        if type(self).prepare_model_outputs is not impl.FSDPEngineWithLMHead.prepare_model_outputs:
            return stock(self, micro_batch, loss_function, forward_only)
        return _forward_step(self, micro_batch, loss_function, forward_only)

    forward_step._rlloss = True
    impl.FSDPEngineWithLMHead.forward_step = forward_step


if os.environ.get("RLLOSS_VERL_PATCH_ENGINE") == "1":
    patch_engine_class()
