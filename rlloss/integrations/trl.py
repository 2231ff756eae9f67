"""TRL's ``GRPOTrainer`` with its loss taken from :func:`rlloss.fused_policy_loss` (TRL 1.16).

:class:`RllossGRPOTrainer` is a drop-in ``trl.GRPOTrainer`` whose ``compute_loss`` runs the model to its last
hidden states, slices the completion positions with :class:`rlloss.PaddedBatch` and takes the loss, straight
from the lm_head weight, from :func:`rlloss.fused_policy_loss` — no logits anywhere. :func:`patch_grpo_trainer`
does the same to an existing trainer instance. :func:`loss_config_from_grpo_config` maps a ``GRPOConfig`` to the
:class:`rlloss.LossConfig` of the same loss and refuses, naming them, the options it cannot honour.

The value, the gradients and TRL's logged metrics equal the stock trainer's (tests/test_integration_trl.py);
the metrics the fused loss cannot give are not logged, never logged with another meaning. The options honoured
and refused, those metrics, and where ``top_entropy_quantile`` differs with several processes:
docs/integrations.md (TRL).
"""
from __future__ import annotations

import functools
import math
import types
import warnings
from typing import Any, Dict

import torch

from ..batching import PaddedBatch
from ..config import LossConfig
from ..policy import fused_policy_loss

try:  # TRL is an optional dependency: pip install "rlloss[trl]"
    import trl
    from trl import GRPOTrainer as _GRPOTrainer
except ImportError as error:  # pragma: no cover - exercised only without TRL
    raise ImportError('rlloss.integrations.trl needs TRL: pip install "trl>=1.16,<1.17"') from error

__all__ = ["RllossGRPOTrainer", "patch_grpo_trainer", "loss_config_from_grpo_config", "SUPPORTED_LOSS_TYPES"]

# TRL loss_type → the rlloss preset of the same loss (docs/presets.md).
SUPPORTED_LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo")
_CLIPPED = ("grpo", "dapo", "dr_grpo", "bnpo", "luspo")  # TRL's clipped-surrogate branch (delta applies here)
_BY_NUM_ITEMS = ("cispo", "dapo", "vespo")  # TRL normalises by num_items_in_batch; the others divide by GA steps
# Multimodal keys of TRL's inputs: the backbone call here passes input_ids and attention_mask only.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def loss_config_from_grpo_config(args: Any) -> LossConfig:
    """The :class:`rlloss.LossConfig` of the loss a ``trl.GRPOConfig`` (``args``) asks for.

    The options honoured and refused are listed in docs/integrations.md (TRL): ``loss_type`` picks the preset of
    the same name, the loss options override its fields, ``temperature`` is checked here and applied by the
    trainer, and vLLM's importance-sampling correction is the trainer's (``_rlloss_compute_loss``).

    Raises:
        ValueError: naming every option set to a value this integration cannot honour (``use_adaptive_entropy``,
            ``use_liger_kernel``; vespo with ``importance_sampling_level="sequence"`` and a ratio-weighted KL,
            whose KL weight TRL takes from the sequence ratio) and any invalid value.
    """
    refused = []
    loss_type = getattr(args, "loss_type", "dapo")
    if loss_type not in SUPPORTED_LOSS_TYPES:
        refused.append(f"loss_type={loss_type!r} (supported: {', '.join(SUPPORTED_LOSS_TYPES)})")
    quantile = getattr(args, "top_entropy_quantile", 1.0)
    if not (isinstance(quantile, (int, float)) and 0.0 < quantile <= 1.0):
        refused.append(f"top_entropy_quantile={quantile!r} (must lie in (0, 1])")
    threshold = getattr(args, "off_policy_mask_threshold", None)
    if threshold is not None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        refused.append(f"off_policy_mask_threshold={threshold!r} (must be a finite number or None)")
    if getattr(args, "use_adaptive_entropy", False):
        refused.append("use_adaptive_entropy=True (only a static entropy_coef is supported)")
    if getattr(args, "use_liger_kernel", False):
        refused.append("use_liger_kernel=True (Liger kernels are not tested with this integration)")
    level = getattr(args, "importance_sampling_level", "token")
    if level not in ("token", "sequence"):
        refused.append(f"importance_sampling_level={level!r} (TRL's GRPOTrainer knows 'token' and 'sequence')")
    elif loss_type == "vespo" and level == "sequence" and args.beta != 0.0 and args.use_bias_correction_kl:
        refused.append("importance_sampling_level='sequence' with loss_type='vespo', beta != 0 and "
                       "use_bias_correction_kl=True (TRL weights the KL by the sequence ratio while VESPO forms "
                       "its own; use the default 'token')")
    temperature = getattr(args, "temperature", 1.0)
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        refused.append(f"temperature={temperature!r} (must be > 0)")
    if refused:
        raise ValueError("rlloss's GRPOTrainer cannot honour these GRPOConfig options: " + "; ".join(refused))

    epsilon = args.epsilon
    epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    fields: Dict[str, Any] = dict(
        epsilon_low=epsilon, epsilon_high=epsilon_high, beta=float(args.beta),
        kl_ratio_weighted=bool(args.use_bias_correction_kl), importance_sampling_level=level,
        entropy_coef=float(getattr(args, "entropy_coef", 0.0)),
    )
    delta = getattr(args, "delta", None)
    if loss_type in _CLIPPED:
        fields["delta"] = delta
    elif delta is not None:
        warnings.warn(f"GRPOConfig.delta={delta} has no effect with loss_type={loss_type!r} in TRL (it caps the "
                      "ratio of the clipped losses only); rlloss follows TRL", stacklevel=2)
    if loss_type == "sapo":
        fields.update(sapo_tau_pos=args.sapo_temperature_pos, sapo_tau_neg=args.sapo_temperature_neg)
    if loss_type == "dr_grpo":
        fields["max_completion_length"] = int(args.max_completion_length)
    if loss_type == "vespo":
        # VESPO forms its sequence ratio from the token log-ratios whatever the level (TRL: the level only
        # weights the KL, refused above when it matters).
        fields.update(importance_sampling_level="token", vespo_k_pos=float(args.vespo_k_pos),
                      vespo_lambda_pos=float(args.vespo_lambda_pos), vespo_k_neg=float(args.vespo_k_neg),
                      vespo_lambda_neg=float(args.vespo_lambda_neg))
    if quantile < 1.0:
        fields.update(token_select="entropy", token_select_fraction=float(quantile))
    if threshold is not None:
        fields["off_policy_mask_threshold"] = float(threshold)
    return LossConfig.preset(loss_type, **fields)


def _logit_transform(model) -> tuple:
    """(softcap, logit_scale) TRL's fused LM head applies to the logits (trl.trainer.utils.add_fused_lm_head)."""
    text_config = model.config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = next((getattr(text_config, name) for name in ("logit_scale", "output_multiplier", "lm_head_multiplier")
                  if getattr(text_config, name, None) is not None), None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return softcap, 1.0 if scale is None else float(scale)


def _install_hidden_forward(target) -> None:
    """Let ``model(..., rlloss_hidden_states=True)`` return the backbone's last hidden states [B, T, D].

    The call still goes through the outermost module (DDP, FSDP, PEFT wrappers forward their keyword arguments),
    as TRL's own fused LM head does; any other call runs the forward the model had before.
    """
    if getattr(target, "_rlloss_hidden_forward", False):
        return
    previous = target.forward

    @functools.wraps(type(target).forward)
    def forward(self, *args, rlloss_hidden_states=False, **kwargs):
        if not rlloss_hidden_states:
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        return self.base_model(*args, **kwargs).last_hidden_state

    target.forward = types.MethodType(forward, target)
    target._rlloss_hidden_forward = True


def _setup(trainer) -> None:
    trainer.rlloss_config = loss_config_from_grpo_config(trainer.args)
    if getattr(trainer, "aux_loss_enabled", False):
        raise ValueError("rlloss's GRPOTrainer cannot honour the MoE load-balancing loss (router_aux_loss_coef "
                         "≠ 0 on a model that returns router logits); set router_aux_loss_coef=0.0")
    if trainer.rlloss_config.token_select is not None and trainer.accelerator.num_processes > 1:
        warnings.warn(f"top_entropy_quantile={trainer.args.top_entropy_quantile} with "
                      f"{trainer.accelerator.num_processes} processes: rlloss takes the entropy quantile over each "
                      "process's micro-batch, TRL over the tokens gathered from every process, so the kept tokens "
                      "(and the loss) can differ from the stock trainer's", stacklevel=3)
    target = trainer.model
    if hasattr(target, "get_base_model") and hasattr(target, "peft_config"):  # PEFT: patch the base model
        target = target.get_base_model()
    _install_hidden_forward(target)
    trainer._rlloss_target = target
    trainer._rlloss_softcap, trainer._rlloss_logit_scale = _logit_transform(target)


def _global_mean(trainer, mean: torch.Tensor, count: torch.Tensor) -> float:
    """TRL's global_masked_mean from a local mean and its count (a sum over processes of sum and count)."""
    count = count.to(torch.float32)
    totals = trainer.accelerator.reduce(torch.stack([mean.detach().float() * count, count]), reduction="sum")
    return (totals[0] / totals[1].clamp(min=1.0)).item()


def _rlloss_compute_loss(trainer, model, inputs):
    """TRL 1.16 ``GRPOTrainer._compute_loss`` with the log-probs and the loss from rlloss."""
    present = [k for k in _MULTIMODAL_KEYS if inputs.get(k) is not None]
    if present:
        raise ValueError(f"rlloss's GRPOTrainer does not take multimodal inputs yet, got {present}")
    config = trainer.rlloss_config
    mode = "train" if trainer.model.training else "eval"
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0

    completion_mask = inputs["completion_mask"]
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    batch = PaddedBatch.from_trl(inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"],
                                 completion_mask)
    # The same model inputs as TRL's (no position_ids: the model's defaults, as in the stock trainer).
    with trainer.accelerator.autocast():
        hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, rlloss_hidden_states=True)
        device_type = hidden.device.type
        autocast_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    hidden = batch.gather_hidden(hidden)

    lm_head = trainer._rlloss_target.get_output_embeddings()
    weight, bias = lm_head.weight, lm_head.bias
    try:
        from torch.distributed.tensor import DTensor
        if isinstance(weight, DTensor):  # FSDP2: gather the head, as TRL does
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
    except ImportError:  # pragma: no cover
        pass
    # TRL's head computes in the autocast dtype when autocast is on (GRPOConfig's default bf16=True), else in the
    # hidden states' dtype; in float32 with cast_lm_head_to_fp32. The same here (the casts carry the gradient).
    dtype = torch.float32 if getattr(trainer.args, "cast_lm_head_to_fp32", False) else autocast_dtype or hidden.dtype
    hidden = hidden.to(device=weight.device, dtype=dtype)
    weight = weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    if trainer._rlloss_logit_scale != 1.0:
        if bias is not None:
            raise ValueError("rlloss's GRPOTrainer cannot apply the model's logit scale with an lm_head bias")
        hidden = hidden * trainer._rlloss_logit_scale

    advantages = inputs["advantages"]
    loss_type = trainer.loss_type
    masked_is = False
    rollout_weights = None
    if loss_type == "vespo":
        # TRL folds the token weights (token modes only, TRL refuses the others) into VESPO's sequence ratio,
        # taking them from the batch whenever they are there; rlloss's vespo does the same with rollout_weights,
        # over the counted tokens (TRL sums the logs over every position; its weights are 1 at the uncounted
        # ones unless the clip bounds exclude 1).
        weight_is = inputs.get("importance_sampling_ratio")
        if weight_is is not None:
            if weight_is.shape != mask.shape:
                raise ValueError(f"loss_type='vespo' takes token-level importance_sampling_ratio [B, T] = "
                                 f"{tuple(mask.shape)} (vllm_importance_sampling_mode 'token_truncate' or "
                                 f"'token_mask'), got {tuple(weight_is.shape)}")
            rollout_weights = weight_is.to(torch.float32)
    elif trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        # TRL multiplies the policy term (not the KL) by the detached weight w ≥ 0, [B, T] (token modes) or
        # [B, 1] (sequence modes); each of these surrogates is positively homogeneous in A, so w·P(ρ, A) =
        # P(ρ, w·A), and the sign of w·A is A's wherever w > 0 (where w = 0 the term is 0 either way, so the
        # off-policy mask's test of A ≥ 0 changes nothing). Folding keeps the one-pass kernel route.
        weight_is = inputs["importance_sampling_ratio"].to(torch.float32)
        folded = (advantages if advantages.dim() == 2 else advantages.unsqueeze(1)) * weight_is
        advantages = folded.squeeze(1) if folded.shape[1] == 1 else folded.expand(mask.shape).contiguous()
        masked_is = trainer.vllm_importance_sampling_mode in ("token_mask", "sequence_mask")
    # TRL's off-policy mask compares the sampling log-probs (vLLM's, else the old ones, else the current ones
    # detached) with the current ones: rlloss takes ℓˢ = rollout_logprobs, else old_logprobs, else sg(ℓ).
    rollout_logprobs = None
    if config.off_policy_mask_threshold is not None:
        rollout_logprobs = inputs.get("sampling_per_token_logps")
    ref = inputs["ref_per_token_logps"] if config.beta != 0.0 else None
    if loss_type in _BY_NUM_ITEMS:
        normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
        if mode == "train":
            normaliser = normaliser * trainer.current_gradient_accumulation_steps / trainer.args.steps_per_generation
        num_items, divide, entropy_scale = normaliser, 1.0, accumulation
    else:
        num_items, divide, entropy_scale = None, accumulation, 1.0
    if config.entropy_coef != 0.0 and entropy_scale != 1.0:
        config = config.replace(entropy_coef=config.entropy_coef / entropy_scale)
    with torch.autocast(hidden.device.type, enabled=False):
        out = fused_policy_loss(hidden, weight, batch.targets, inputs.get("old_per_token_logps"), advantages,
                                mask.bool(), config=config, bias=bias, ref_logprobs=ref,
                                rollout_logprobs=rollout_logprobs, rollout_weights=rollout_weights,
                                temperature=float(trainer.temperature), softcap=trainer._rlloss_softcap,
                                num_items_in_batch=num_items)
    loss = out.loss / divide if divide != 1.0 else out.loss

    metrics = trainer._metrics[mode]
    m = out.metrics
    tokens = mask.sum()
    if config.entropy_coef != 0.0:
        # TRL's policy_loss: the loss before the entropy bonus and before the accumulation division. With
        # top_entropy_quantile < 1 the bonus is the mean entropy of the kept tokens, which the fused loss does
        # not report: not logged then.
        if config.token_select is None:
            policy = out.loss.detach() + config.entropy_coef * m["entropy"].detach()
            metrics["policy_loss"].append(trainer.accelerator.gather(policy).nanmean().item())
        if mode == "train" and trainer.accelerator.sync_gradients:
            metrics["entropy_coef"].append(trainer.entropy_coef)
    if config.beta != 0.0:
        metrics["kl"].append(_global_mean(trainer, m["kl"], tokens))
    metrics["entropy"].append(_global_mean(trainer, m["entropy"], tokens))
    # Clip fractions (token level only: at the sequence level TRL counts one value per sequence, which the
    # token-weighted means of the fused loss cannot give; nor with vLLM's masked importance-sampling modes,
    # where TRL still counts the tokens of weight 0 by the sign of A, which w·A no longer carries).
    if config.importance_sampling_level == "token" and not masked_is:
        if loss_type in _CLIPPED:
            for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
                metrics[name].append(_global_mean(trainer, m[name], tokens))
        elif loss_type == "cispo":
            metrics["cispo_clip_ratio"].append(_global_mean(trainer, m["clip_ratio/high_mean"], tokens))
    return loss


class RllossGRPOTrainer(_GRPOTrainer):
    """``trl.GRPOTrainer`` whose loss is :func:`rlloss.fused_policy_loss` on the last hidden states.

    Takes exactly ``GRPOTrainer``'s arguments; the loss comes from ``args`` through
    :func:`loss_config_from_grpo_config` (available afterwards as ``trainer.rlloss_config``), which raises for
    the options it cannot honour.

    Example:
        >>> trainer = RllossGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...),
        ...                             train_dataset=dataset)
        >>> trainer.train()
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _setup(self)

    def _compute_loss(self, model, inputs):
        return _rlloss_compute_loss(self, model, inputs)


def patch_grpo_trainer(trainer: "trl.GRPOTrainer") -> "trl.GRPOTrainer":
    """Replace the loss computation of an existing ``trl.GRPOTrainer`` instance by rlloss's (in place).

    Returns the same trainer. Raises ValueError, as :func:`loss_config_from_grpo_config`, for options it
    cannot honour; TypeError for anything that is not a GRPOTrainer.
    """
    if not isinstance(trainer, _GRPOTrainer):
        raise TypeError(f"patch_grpo_trainer expects a trl.GRPOTrainer, got {type(trainer).__name__}")
    _setup(trainer)
    trainer._compute_loss = types.MethodType(_rlloss_compute_loss, trainer)
    return trainer
