"""Configuration of the policy loss (docs/math.md §3–§6): one frozen dataclass and the named presets.

Every field is validated on construction, so a bad value fails where it is written, not inside a kernel.
``LossConfig.preset(name, **overrides)`` gives the settings of a trainer's named loss; docs/presets.md maps
each preset to the TRL / verl options it reproduces.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

from . import _checks

# The mode tables and verl's log-ratio guard are the kernels' (kernels/tables.py), re-exported here.
from .kernels.tables import CREDIT_MODES, IS_LEVELS, KL_ESTIMATORS, LOSS_MODES, VERL_LOG_RATIO_CLAMP

__all__ = ["LossConfig", "LOSS_MODES", "KL_ESTIMATORS", "IS_LEVELS", "ROLLOUT_CORRECTIONS", "AGGREGATIONS",
           "TERM_AGGREGATIONS", "CREDIT_MODES", "ROLLOUT_RS_OPTIONS", "TOKEN_SELECT_SCORES"]

# Loss modes whose per-token term needs quantities of the whole sequence (geo_mean, vespo) or of the whole batch
# (clip_cov, kl_cov) at the current log-probs: FusedPolicyLoss takes its two-pass route for them.
NON_LOCAL_LOSS_MODES = ("geo_mean", "clip_cov", "kl_cov", "vespo")
# verl's kl_loss_type names, normalised on construction to (kl_estimator, kl_clamp or None = unchanged). verl's
# trailing "+" means: the estimator's value with the k2 gradient (straight-through); on k2 itself it changes nothing.
VERL_KL_NAMES = {
    "kl": ("k1", None), "kl+": ("k1+", None), "mse": ("k2", None), "mse+": ("k2", None), "k2+": ("k2", None),
    "low_var_kl": ("k3", True), "low_var_kl+": ("k3+", True),
}
ROLLOUT_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# verl's rejection-sampling criteria (rollout_corr_helper.SUPPORTED_ROLLOUT_RS_OPTIONS): a divergence of ℓ° from ℓˢ
# per token, or its sum / mean / max over the sequence, k1 bounded on both sides, k2 and k3 from above.
ROLLOUT_RS_OPTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
                      "seq_mean_k1", "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")
AGGREGATIONS = (
    "seq_mean_token_mean",
    "token_mean",
    "seq_mean_token_sum",
    "seq_mean_token_sum_norm",
    "token_sum",
)
# Aggregations of the KL and entropy terms (kl_aggregation, entropy_aggregation): the policy's, plus TRL's entropy
# mean over the local mask whatever num_items_in_batch says.
TERM_AGGREGATIONS = AGGREGATIONS + ("token_mean_local",)
# Scores of the token selection (token_select): the entropy H (TRL's top_entropy_quantile) or |Â|·H (D³S).
TOKEN_SELECT_SCORES = ("entropy", "adv_entropy")

# verl's guard on the GSPO token-form log-ratio (clamp(log ρ, max=10)).
VERL_GSPO_LOG_RATIO_MAX = 10.0


def _finite(name: str, value: object) -> float:
    return _checks.number(f"LossConfig.{name}", value, finite=True)


def _choice(name: str, value: object, allowed) -> None:
    _checks.choice(f"LossConfig.{name}", value, allowed)


# The numeric fields: (names, the test each passes, the range the error states); each must be a finite number, and
# those of _OPTIONAL_NUMBERS may be None. epsilon_high, delta, dual_clip and rollout_threshold_low depend on other
# fields and are checked in __post_init__.
_RANGES = (
    (("epsilon_low",), lambda x: 0.0 <= x <= 1.0, "lie in [0, 1]"),
    (("beta",), lambda x: x >= 0.0, "be >= 0"),
    (("sapo_tau_pos", "sapo_tau_neg", "rollout_threshold_high", "dppo_ratio_cap", "dro_beta"), lambda x: x > 0.0,
     "be > 0"),
    (("clip_cov_ratio", "kl_cov_ratio", "token_select_fraction"), lambda x: 0.0 < x <= 1.0, "lie in (0, 1]"),
    (("log_ratio_min", "log_ratio_max", "entropy_coef", "clip_cov_lb", "clip_cov_ub", "kl_cov_coef", "vespo_k_pos",
      "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "off_policy_mask_threshold"), lambda x: True, ""),
)
_OPTIONAL_NUMBERS = ("log_ratio_min", "log_ratio_max", "dro_beta", "off_policy_mask_threshold")


@dataclass(frozen=True)
class LossConfig:
    """Settings of :func:`rlloss.policy_loss` (docs/math.md §3–§6). Defaults: ε = 0.2 both sides, β = 0, token-mean
    (TRL's ``loss_type="dapo"``), the KL not ratio-weighted and every term aggregated alike; prefer :meth:`preset`,
    whose TRL and verl presets equal those trainers' defaults in full (``preset("dapo")`` is TRL's default loss,
    with TRL's ratio-weighted KL and local-mean entropy bonus).

    Policy term (docs/math.md §4):
        loss_mode: "ppo_clip" (clipped surrogate, optionally with ``delta`` and ``dual_clip``),
            "cispo_trl" (−sg(min(ρ, ε_hi))·A·ℓ, ε_hi an absolute cap), "cispo_verl" (−sg(clip(ρ, 1−ε_lo,
            1+ε_hi))·A·ℓ), "gpg" (−A·ℓ, REINFORCE), "sapo" (soft gate −(4/τ)·σ(τ(ρ−1))·A).
        epsilon_low, epsilon_high: clip range [1 − ε_lo, 1 + ε_hi] (``cispo_trl``: ε_hi is the cap itself).
            Also used for the clip-fraction metrics of every mode.
        delta: TRL's upper cap on the unclipped ratio, ρ̃ = min(ρ, δ) (INTELLECT-2 two-sided clipping); > 1.
        dual_clip: verl's dual-clip constant c > 1 (``clip_ratio_c``): for A < 0, L = min(L, −c·A).
        sapo_tau_pos, sapo_tau_neg: SAPO temperatures for A > 0 and A ≤ 0.
    Ratios (docs/math.md §3):
        importance_sampling_level: "token", "sequence" (GSPO: the sequence ratio s_i, its gradient reaching
            every token) or "sequence_token" (GSPO-token: s_i's value, each token's own gradient).
        log_ratio_min, log_ratio_max: clamp of the log importance ratio before exp (token: ℓ − ℓ°; sequence
            levels: log s_i) — zero gradient outside. verl: ±20 (token), max 10 (GSPO). None = no clamp.
    KL to the reference (docs/math.md §4), added as +β·KL_t:
        beta: β ≥ 0 (needs ``ref_logprobs`` when ≠ 0).
        kl_estimator: "k1", "abs", "k2", "k3", "k3+" (value of k3, gradient of k2), "k1+", "abs+" (value of
            k1 / abs, gradient of k2). verl's ``kl_loss_type`` names are accepted and normalised on construction:
            "kl" → "k1", "mse" → "k2", "low_var_kl" → "k3" with ``kl_clamp=True``, "low_var_kl+" → "k3+" with
            ``kl_clamp=True``, "kl+" → "k1+", "k2+" / "mse+" → "k2". (verl's plain "k3" is clamped as well:
            pass ``kl_clamp=True`` or "low_var_kl".)
        kl_ratio_weighted: KL_t·ρ_t (TRL ``use_bias_correction_kl``), ρ carrying its gradient.
        kl_clamp: verl's guards on k3/k3+ values: x = ℓʳ − ℓ clamped to ±20, the value to ±10.
    Entropy (docs/math.md §4):
        entropy_coef: c_H, adds −c_H·H_t (needs ``entropy`` when ≠ 0).
    Aggregation of the KL and entropy terms (docs/math.md §4, §6), each a per-token coefficient like the policy's:
        kl_aggregation: None (as ``aggregation``, TRL and verl except SAPO) or one of AGGREGATIONS /
            "token_mean_local" for the β·KL term.
        entropy_aggregation: None (as ``aggregation``: verl) or one of AGGREGATIONS, or "token_mean_local"
            (Σ m·H / max(Σ m, 1) over the local mask whatever ``num_items_in_batch`` is: TRL's entropy bonus).
        verl SAPO aggregates its policy term by seq_mean_token_mean but KL and entropy by ``loss_agg_mode``.
    Rollout correction (docs/math.md §5), a detached weight on the policy term:
        rollout_correction: None, "token_truncate", "token_mask", "sequence_truncate", "sequence_mask".
        rollout_threshold_low, rollout_threshold_high: [C_min, C_max]; C_min None = no lower bound.
    Aggregation (docs/math.md §6):
        aggregation: "seq_mean_token_mean", "token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm",
            "token_sum".
        max_completion_length: L_norm of "seq_mean_token_sum_norm" (required there; verl's
            ``loss_scale_factor``, by default the padded response length).
        dp_size: data-parallel world size multiplying every "token_sum" term (verl's ``token-sum`` scales the
            local sum by ``dp_size`` so that DDP's gradient average gives the global sum). Other aggregations
            take global counts (``num_items_in_batch``, ``num_sequences_in_batch``) divided by the world size.
    Contrastive-teacher token credit (docs/math.md §7), formed inside the loss from teacher log-probs:
        credit: None, "cepo" (Δ = ℓ⁺ − ℓ⁻, needs ``pos_logprobs`` and ``neg_logprobs``) or "rlsd"
            (Δ = ℓ⁺ − ℓ°, needs ``pos_logprobs``; ℓ° = ``old_logprobs``, or sg(ℓ) on-policy); Â_t replaces A.
        credit_lambda: λ ∈ [0, 1] (0 = plain GRPO). A schedule is the trainer's: ``config.replace(
            credit_lambda=rlloss.LinearDecay(0.5, 25)(step))`` at each step.
        credit_eps_w: ε_w ∈ [0, 1), the clip of the token weight w.
    Peer loss variants (docs/math.md §4, §5; docs/presets.md names the peer option of each):
        loss_mode also takes verl's "geo_mean" (GMPO), "clip_cov", "kl_cov", "dppo_tv", "dppo_kl" (ε_lo / ε_hi
            the bounds of the divergence trust region), "dro" and TRL's "vespo", each term as in docs/math.md §4
            (the peer variants' table). "clip_cov" draws its tokens with
            ``torch.randperm`` on torch's default generator, as verl does: seed it (``torch.manual_seed``) to
            reproduce a selection.
        clip_cov_ratio, clip_cov_lb, clip_cov_ub: fraction of the counted tokens whose gradient "clip_cov"
            drops (at least one), chosen among those with covariance in (lb, ub) (verl: 2e-4, 1, 5).
        kl_cov_ratio, kl_cov_coef: fraction of the counted tokens (at least one) that "kl_cov" penalises and
            the coefficient of the penalty (verl ``kl_cov_ratio`` 2e-4, ``ppo_kl_coef`` 0.1).
        dppo_ratio_cap: the truncation c of the DPPO ratio (verl ``clip_ratio_c``, default 3).
        dro_beta: β > 0 of "dro" (verl ``dro_beta``; required there).
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: k and λ of VESPO's φ(w) = e^λ·w^k·e^{−λw}
            for A ≥ 0 and A < 0 (TRL: 2, 3, 3, 2).
        rollout_is_batch_normalize: divide the rollout weights by their mean over the counted tokens
            (token levels) or the non-empty sequences (sequence levels) of the call (verl
            ``rollout_is_batch_normalize``; verl takes the mean over the whole training batch).
        rollout_rs: verl's rejection sampling, one of ROLLOUT_RS_OPTIONS or several joined by commas (all must
            pass): tokens (or whole sequences) whose divergence of ℓ° from ℓˢ falls outside the bound leave the
            mask of every term, as in verl (needs ``rollout_logprobs``).
        rollout_rs_threshold: verl's ``rollout_rs_threshold``: one bound shared by the options, or one per
            option joined by commas; for k1 options "lower_upper" ratio bounds (a single u means 1/u_u), for the
            others an upper bound on the divergence.
    Selection (docs/math.md §9), a 0/1 factor on the policy term formed inside the loss; normalisers unchanged:
        token_select: None, "entropy" (score H_t: TRL's ``top_entropy_quantile``) or "adv_entropy" (score
            |Â_t|·H_t: D³S's token level). Keeps the counted tokens whose score is ≥ the (1 − q)-quantile
            (linear interpolation, as torch.quantile) of the scores of all counted tokens of the call; the
            entropy bonus then acts on the kept tokens only (TRL).
        token_select_fraction: q ∈ (0, 1], the fraction kept (TRL ``top_entropy_quantile``).
        off_policy_mask_threshold: δ of TRL's off-policy sequence mask (DeepSeek-V3.2): a token is dropped when
            A < 0 and its sequence's mean of ℓˢ − sg(ℓ) over the mask exceeds δ (ℓˢ: ``rollout_logprobs``, else
            ``old_logprobs``, else sg(ℓ)). None = off.
        Both need the whole batch's log-probs or entropy: FusedPolicyLoss takes its two-pass route (8·N·D·V),
        and the Triton policy kernel hands them to the torch formulas.
    Per-sequence clip ranges are call arguments (``epsilon_low=`` / ``epsilon_high=`` tensors of
    :func:`rlloss.policy_loss` and :class:`rlloss.FusedPolicyLoss`), not fields.
    """

    loss_mode: str = "ppo_clip"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: Optional[float] = None
    dual_clip: Optional[float] = None
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    importance_sampling_level: str = "token"
    log_ratio_min: Optional[float] = None
    log_ratio_max: Optional[float] = None
    beta: float = 0.0
    kl_estimator: str = "k3"
    kl_ratio_weighted: bool = False
    kl_clamp: bool = False
    entropy_coef: float = 0.0
    rollout_correction: Optional[str] = None
    rollout_threshold_low: Optional[float] = None
    rollout_threshold_high: float = 2.0
    aggregation: str = "token_mean"
    max_completion_length: Optional[int] = None
    kl_aggregation: Optional[str] = None
    entropy_aggregation: Optional[str] = None
    dp_size: int = 1
    credit: Optional[str] = None
    credit_lambda: float = 0.5
    credit_eps_w: float = 0.2
    # peer loss variants
    clip_cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 0.0002
    kl_cov_coef: float = 0.1
    dppo_ratio_cap: float = 3.0
    dro_beta: Optional[float] = None
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    rollout_is_batch_normalize: bool = False
    rollout_rs: Optional[str] = None
    rollout_rs_threshold: Union[float, str, None] = None
    # selection and trust-region extension points
    token_select: Optional[str] = None
    token_select_fraction: float = 1.0
    off_policy_mask_threshold: Optional[float] = None

    def __post_init__(self) -> None:
        _choice("loss_mode", self.loss_mode, LOSS_MODES)
        _choice("importance_sampling_level", self.importance_sampling_level, IS_LEVELS)
        if isinstance(self.kl_estimator, str) and self.kl_estimator in VERL_KL_NAMES:
            estimator, clamp = VERL_KL_NAMES[self.kl_estimator]
            object.__setattr__(self, "kl_estimator", estimator)
            if clamp is not None:
                object.__setattr__(self, "kl_clamp", clamp)
        _choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _choice("aggregation", self.aggregation, AGGREGATIONS)
        for name in ("kl_aggregation", "entropy_aggregation"):
            _choice(name, getattr(self, name), (None,) + TERM_AGGREGATIONS)
        _checks.integer("LossConfig.dp_size", self.dp_size, minimum=1)
        _choice("rollout_correction", self.rollout_correction, (None,) + ROLLOUT_CORRECTIONS)
        for name in ("kl_ratio_weighted", "kl_clamp", "rollout_is_batch_normalize"):
            _checks.boolean(f"LossConfig.{name}", getattr(self, name))
        for names, in_range, expected in _RANGES:
            for name in names:
                value = getattr(self, name)
                if (value is not None or name not in _OPTIONAL_NUMBERS) and not in_range(_finite(name, value)):
                    raise ValueError(f"LossConfig.{name} must {expected}, got {value}")

        eps_hi = _finite("epsilon_high", self.epsilon_high)
        if eps_hi < 0.0 or (self.loss_mode == "cispo_trl" and eps_hi <= 0.0):
            raise ValueError(
                f"LossConfig.epsilon_high must be >= 0 (> 0 for loss_mode='cispo_trl', where it is the absolute "
                f"cap on the ratio), got {eps_hi}"
            )
        if self.delta is not None:
            if self.loss_mode != "ppo_clip":
                raise ValueError(f"LossConfig.delta applies to loss_mode='ppo_clip' only, got {self.loss_mode!r}")
            if _finite("delta", self.delta) <= 1.0:
                raise ValueError(f"LossConfig.delta must be > 1 (TRL recommends > 1 + ε), got {self.delta}")
        if self.dual_clip is not None:
            if self.loss_mode != "ppo_clip":
                raise ValueError(f"LossConfig.dual_clip applies to loss_mode='ppo_clip' only, got {self.loss_mode!r}")
            if _finite("dual_clip", self.dual_clip) <= 1.0:
                raise ValueError(f"LossConfig.dual_clip must be > 1 (verl clip_ratio_c), got {self.dual_clip}")
        lo, hi = self.log_ratio_min, self.log_ratio_max
        if lo is not None and hi is not None and not lo < hi:
            raise ValueError(f"LossConfig.log_ratio_min must be < log_ratio_max, got {lo} and {hi}")
        if self.rollout_threshold_low is not None:
            c_min, c_max = _finite("rollout_threshold_low", self.rollout_threshold_low), self.rollout_threshold_high
            if not 0.0 <= c_min < c_max:
                raise ValueError(
                    f"LossConfig.rollout_threshold_low must lie in [0, rollout_threshold_high = {c_max}), "
                    f"got {c_min}"
                )
        if self.max_completion_length is not None and _checks.integer(
                "LossConfig.max_completion_length", self.max_completion_length) < 1:
            raise ValueError(f"LossConfig.max_completion_length must be > 0, got {self.max_completion_length}")
        from .credit import check_credit_params  # imported here: rlloss.credit may import this module

        _choice("credit", self.credit, (None,) + CREDIT_MODES)
        check_credit_params(self.credit_lambda, self.credit_eps_w, where="LossConfig.")
        self._check_peer_variants()
        _choice("token_select", self.token_select, (None,) + TOKEN_SELECT_SCORES)
        if self.token_select_fraction != 1.0 and self.token_select is None:
            raise ValueError(f"LossConfig.token_select_fraction = {self.token_select_fraction} needs token_select "
                             "('entropy' or 'adv_entropy'), got None")
        for name, agg in zip(("aggregation", "kl_aggregation", "entropy_aggregation"), self.term_aggregations):
            if agg == "seq_mean_token_sum_norm" and self.max_completion_length is None:
                raise ValueError(
                    f"LossConfig.{name}='seq_mean_token_sum_norm' needs max_completion_length (the constant "
                    "L_norm of Dr. GRPO), got None"
                )
        # Computed once here, so that traced code (torch.compile) only reads an attribute.
        object.__setattr__(self, "_key", json.dumps(dataclasses.asdict(self), sort_keys=True))

    def _check_peer_variants(self) -> None:
        mode = self.loss_mode
        if not self.clip_cov_lb < self.clip_cov_ub:
            raise ValueError(f"LossConfig.clip_cov_lb must be < clip_cov_ub, got {self.clip_cov_lb} and "
                             f"{self.clip_cov_ub}")
        if mode == "dro" and self.dro_beta is None:
            raise ValueError("LossConfig.dro_beta is required when loss_mode='dro' (verl policy_loss.dro_beta), "
                             "got None")
        if mode in ("geo_mean", "vespo") and self.importance_sampling_level != "token":
            raise ValueError(f"LossConfig.loss_mode={mode!r} forms its own sequence ratio: "
                             f"importance_sampling_level must be 'token', got {self.importance_sampling_level!r}")
        if mode == "geo_mean" and self.credit is not None:
            raise ValueError("LossConfig.credit is not available with loss_mode='geo_mean' (its advantage is the "
                             f"sequence mean of A), got credit={self.credit!r}")
        if mode == "vespo" and self.rollout_correction is not None and self.rollout_correction.startswith("sequence"):
            raise ValueError("LossConfig.loss_mode='vespo' folds token-level rollout weights into its sequence "
                             f"ratio (as TRL): rollout_correction must be token-level, got {self.rollout_correction!r}")
        if self.rollout_is_batch_normalize and self.rollout_correction is None:
            raise ValueError("LossConfig.rollout_is_batch_normalize needs a rollout_correction to normalise, got None")
        if self.rollout_rs is None:
            if self.rollout_rs_threshold is not None:
                raise ValueError("LossConfig.rollout_rs_threshold is set but rollout_rs is None")
        else:
            self.rollout_rs_bounds  # parses and checks both fields

    @property
    def rollout_rs_bounds(self) -> Tuple[Tuple[str, Optional[float], float], ...]:
        """``rollout_rs`` parsed: (option, lower, upper) per distinct option, in order. k1 options bound the ratio
        exp(−k1) … (lower, upper > 0); the others bound the divergence from above (lower None)."""
        if self.rollout_rs is None:
            return ()
        _checks.instance("LossConfig.rollout_rs", self.rollout_rs, str, "a str")
        options = list(dict.fromkeys(o.strip() for o in self.rollout_rs.split(",") if o.strip()))
        if not options:
            raise ValueError(f"LossConfig.rollout_rs must name at least one option, got {self.rollout_rs!r}")
        for option in options:
            _choice("rollout_rs", option, ROLLOUT_RS_OPTIONS)
        spec = self.rollout_rs_threshold
        if spec is None:
            raise ValueError(f"LossConfig.rollout_rs_threshold is required when rollout_rs={self.rollout_rs!r}")
        if not (_checks.is_number(spec) or isinstance(spec, str)):
            raise TypeError(f"LossConfig.rollout_rs_threshold must be a number or a str, got {type(spec).__name__}")
        parts = [str(spec)] if not isinstance(spec, str) else [p.strip() for p in spec.split(",") if p.strip()]
        if len(parts) not in (1, len(options)):
            raise ValueError(f"LossConfig.rollout_rs_threshold must give one bound or one per rollout_rs option "
                             f"({len(options)}), got {spec!r}")
        parts = parts * len(options) if len(parts) == 1 else parts
        bounds = []
        for option, part in zip(options, parts):
            try:
                if option.endswith("k1"):
                    lower_s, upper_s = part.split("_", 1) if "_" in part else (None, part)
                    upper = float(upper_s)
                    lower = 1.0 / upper if lower_s is None else float(lower_s)
                else:
                    if "_" in part:
                        raise ValueError(part)
                    lower, upper = None, float(part)
            except (ValueError, ZeroDivisionError):
                raise ValueError(f"LossConfig.rollout_rs_threshold {part!r} is not a bound for {option!r} "
                                 "('lower_upper' or one number for k1 options, one number otherwise)") from None
            if not (math.isfinite(upper) and upper > 0.0 and (lower is None or 0.0 < lower <= upper)):
                raise ValueError(f"LossConfig.rollout_rs_threshold for {option!r} must be positive (lower <= upper), "
                                 f"got {part!r}")
            bounds.append((option, lower, upper))
        return tuple(bounds)

    @property
    def selects(self) -> bool:
        """True when a selection (token_select, off_policy_mask_threshold) is on: it needs the whole batch."""
        return self.token_select is not None or self.off_policy_mask_threshold is not None

    @property
    def key(self) -> str:
        """The config as a JSON string: how the registered torch ops (``rlloss::policy_loss`` …) take it."""
        return self._key

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def from_key(key: str) -> "LossConfig":
        """The config whose :attr:`key` is ``key``."""
        return LossConfig(**json.loads(key))

    @property
    def term_aggregations(self) -> tuple:
        """(policy, KL, entropy) aggregations, None resolved to ``aggregation``."""
        return (self.aggregation, self.kl_aggregation or self.aggregation,
                self.entropy_aggregation or self.aggregation)

    @property
    def uniform_aggregation(self) -> bool:
        """True when every term that is on (β ≠ 0, c_H ≠ 0) is aggregated like the policy term: one coefficient
        per token, which is what the Triton kernel implements."""
        policy, kl, entropy = self.term_aggregations
        return (self.beta == 0.0 or kl == policy) and (self.entropy_coef == 0.0 or entropy == policy)

    def replace(self, **changes) -> "LossConfig":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides) -> "LossConfig":
        """The settings of a named loss, with ``overrides`` applied on top (see docs/presets.md).

        TRL flavours: "grpo", "dapo" (TRL's default loss: ε_hi = ε = 0.2), "dapo_paper" (the DAPO paper's
        ε_hi = 0.28), "dr_grpo" (needs ``max_completion_length=``), "bnpo", "gspo", "cispo", "sapo"; verl's
        "gpg", "luspo", "vespo". verl flavours (log-ratio clamp, dual clip, clamped k3): "verl_grpo", "verl_dapo",
        "verl_gspo", "verl_cispo", "verl_sapo", "verl_geo_mean", "verl_clip_cov", "verl_kl_cov", "verl_dppo_tv",
        "verl_dppo_kl", "verl_dro" (needs ``dro_beta=``).
        """
        _checks.instance("preset name", name, str, "a str")
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {tuple(PRESETS)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown LossConfig field(s) in overrides: {sorted(unknown)}")
        return cls(**{**PRESETS[name], **overrides})


_VERL_RATIO = dict(log_ratio_min=-VERL_LOG_RATIO_CLAMP, log_ratio_max=VERL_LOG_RATIO_CLAMP)

# Each preset is a set of LossConfig fields; defaults not listed. Sources and the tests that check each one
# against the trainer's code: docs/presets.md, tests/test_presets.py.
# TRL 1.16 GRPOConfig(loss_type=...) defaults: ε = 0.2 (epsilon_high defaults to epsilon), β = 0 with the unclamped
# k3 KL weighted by the ratio (use_bias_correction_kl=True), the entropy bonus the token mean over the local mask.
_TRL = dict(kl_estimator="k3", kl_ratio_weighted=True, entropy_aggregation="token_mean_local")
# verl 0.9 actor defaults: clip_ratio 0.2, kl_loss_type low_var_kl (k3 clamped), KL and entropy aggregated by
# loss_agg_mode. kl_clamp is set explicitly, so that an override kl_estimator="k3" / "k3+" keeps verl's clamp (verl
# clamps its "k3" as its "low_var_kl").
_VERL_KL = dict(kl_estimator="k3", kl_clamp=True)

PRESETS = {
    "grpo": dict(loss_mode="ppo_clip", epsilon_low=0.2, epsilon_high=0.2, aggregation="seq_mean_token_mean", **_TRL),
    "dapo": dict(loss_mode="ppo_clip", epsilon_low=0.2, epsilon_high=0.2, aggregation="token_mean", **_TRL),
    # The DAPO paper's clip-higher (ε_hi = 0.28): GRPOConfig(loss_type="dapo", epsilon_high=0.28).
    "dapo_paper": dict(loss_mode="ppo_clip", epsilon_low=0.2, epsilon_high=0.28, aggregation="token_mean", **_TRL),
    "dr_grpo": dict(loss_mode="ppo_clip", epsilon_low=0.2, epsilon_high=0.2, aggregation="seq_mean_token_sum_norm",
                    **_TRL),
    "bnpo": dict(loss_mode="ppo_clip", epsilon_low=0.2, epsilon_high=0.2, aggregation="token_mean", **_TRL),
    "gspo": dict(loss_mode="ppo_clip", epsilon_low=3e-4, epsilon_high=4e-4, importance_sampling_level="sequence",
                 aggregation="seq_mean_token_mean", **_TRL),
    "cispo": dict(loss_mode="cispo_trl", epsilon_low=0.2, epsilon_high=5.0, aggregation="token_mean", **_TRL),
    "sapo": dict(loss_mode="sapo", sapo_tau_pos=1.0, sapo_tau_neg=1.05, aggregation="seq_mean_token_mean", **_TRL),
    # verl loss_mode="gpg" (TRL has none), verl's defaults.
    "gpg": dict(loss_mode="gpg", aggregation="token_mean", **_VERL_KL),
    # verl actor.policy_loss.loss_mode=... with its numerical guards.
    "verl_grpo": dict(loss_mode="ppo_clip", epsilon_low=0.2, epsilon_high=0.2, dual_clip=3.0, beta=0.001,
                      aggregation="token_mean", **_VERL_KL, **_VERL_RATIO),
    "verl_dapo": dict(loss_mode="ppo_clip", epsilon_low=0.2, epsilon_high=0.28, dual_clip=3.0,
                      aggregation="token_mean", **_VERL_KL, **_VERL_RATIO),
    # GSPO aggregates by the configured loss_agg_mode (default token-mean); ε of the GSPO recipe.
    "verl_gspo": dict(loss_mode="ppo_clip", epsilon_low=3e-4, epsilon_high=4e-4,
                      importance_sampling_level="sequence_token", log_ratio_max=VERL_GSPO_LOG_RATIO_MAX,
                      aggregation="token_mean", **_VERL_KL),
    "verl_cispo": dict(loss_mode="cispo_verl", epsilon_low=0.2, epsilon_high=0.2, aggregation="token_mean",
                       **_VERL_KL, **_VERL_RATIO),
    # SAPO forces seq-mean-token-mean on its policy term only; KL and entropy keep loss_agg_mode (token-mean).
    "verl_sapo": dict(loss_mode="sapo", sapo_tau_pos=1.0, sapo_tau_neg=1.05, aggregation="seq_mean_token_mean",
                      kl_aggregation="token_mean", entropy_aggregation="token_mean", **_VERL_KL, **_VERL_RATIO),
    # peer loss variants. TRL's LUSPO: the clipped surrogate summed per sequence, averaged over sequences, at the
    # sequence level its docs ask for; VESPO: normalised like dapo.
    "luspo": dict(loss_mode="ppo_clip", epsilon_low=0.2, epsilon_high=0.2, importance_sampling_level="sequence",
                  aggregation="seq_mean_token_sum", **_TRL),
    "vespo": dict(loss_mode="vespo", aggregation="token_mean", **_TRL),
    # verl: GMPO ignores loss_agg_mode (a mean over sequences), its KL and entropy keep it; no log-ratio clamp in
    # geo_mean, clip_cov, kl_cov and dro; DPPO truncates at clip_ratio_c (3) and clamps like vanilla.
    "verl_geo_mean": dict(loss_mode="geo_mean", epsilon_low=0.2, epsilon_high=0.2, aggregation="seq_mean_token_mean",
                          kl_aggregation="token_mean", entropy_aggregation="token_mean", **_VERL_KL),
    "verl_clip_cov": dict(loss_mode="clip_cov", epsilon_low=0.2, epsilon_high=0.2, aggregation="token_mean",
                          **_VERL_KL),
    "verl_kl_cov": dict(loss_mode="kl_cov", aggregation="token_mean", **_VERL_KL),
    "verl_dppo_tv": dict(loss_mode="dppo_tv", epsilon_low=0.2, epsilon_high=0.2, dppo_ratio_cap=3.0,
                         aggregation="token_mean", **_VERL_KL, **_VERL_RATIO),
    "verl_dppo_kl": dict(loss_mode="dppo_kl", epsilon_low=0.2, epsilon_high=0.2, dppo_ratio_cap=3.0,
                         aggregation="token_mean", **_VERL_KL, **_VERL_RATIO),
    # dro_beta has no default in verl: preset("verl_dro", dro_beta=...).
    "verl_dro": dict(loss_mode="dro", aggregation="token_mean", **_VERL_KL),
}
