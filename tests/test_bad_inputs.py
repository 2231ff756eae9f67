"""Bad-input catalogue (issue #11): every public function and constructor, fed a wrong type, shape, rank or
dtype, an out-of-range target, a non-finite scalar or an unknown mode/backend, raises the documented
TypeError/ValueError — and the message names the argument (DESIGN.md, Numerics: "raises ValueError/TypeError
naming the argument, what was expected and what was given"). Tensors on different devices are not testable
on one device and are left out.

Each case is one call; ``match`` is a regular expression that must find the argument's name in the message.
A case that shows a defect in a file owned elsewhere is a strict xfail whose reason states the defect.
"""
import math

import numpy as np
import pytest
import torch
from conftest import HAS_CUDA

import rlloss
from rlloss import (FusedPolicyLoss, LinearDecay, LossConfig, SharedPrefixBatch, SharedPrefixLayout,
                    contrastive_credit, fused_policy_loss, group_advantages, logprobs_from_logits, policy_loss,
                    shared_prefix_attention, token_logprobs)
from rlloss.teacher import build_teacher_inputs

B, T, D, V = 2, 3, 4, 5
NAN, INF = math.nan, math.inf


def _case(case_id, error, match, call, xfail=None):
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(call, error, match, id=case_id, marks=marks)


# --- fresh valid inputs; each call below breaks exactly one argument ---------------------------------------


def _logprobs(**kw):
    args = dict(hidden=torch.randn(B, T, D), weight=torch.randn(V, D), targets=torch.randint(0, V, (B, T)))
    args.update(kw)
    return token_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


def _from_logits(**kw):
    args = dict(logits=torch.randn(B, T, V), targets=torch.randint(0, V, (B, T)))
    args.update(kw)
    return logprobs_from_logits(args.pop("logits"), args.pop("targets"), **args)


def _advantages(**kw):
    args = dict(rewards=torch.randn(6), group_size=3)
    args.update(kw)
    return group_advantages(args.pop("rewards"), **args)


def _policy(**kw):
    args = dict(logprobs=-torch.rand(B, T), old_logprobs=-torch.rand(B, T), advantages=torch.randn(B),
                mask=torch.rand(B, T) < 0.7, config=LossConfig())
    args.update(kw)
    return policy_loss(args.pop("logprobs"), args.pop("old_logprobs"), args.pop("advantages"), args.pop("mask"),
                       **args)


def _fused(module_kw=None, **kw):
    args = dict(hidden=torch.randn(B, T, D), weight=torch.randn(V, D), targets=torch.randint(0, V, (B, T)),
                mask=torch.ones(B, T, dtype=torch.bool), advantages=torch.randn(B))
    args.update(kw)
    module = FusedPolicyLoss(LossConfig(), **(module_kw or {}))
    return module(args.pop("hidden"), args.pop("weight"), args.pop("targets"), args.pop("mask"),
                  args.pop("advantages"), **args)


def _credit(**kw):
    args = dict(advantages=torch.randn(B), mask=torch.rand(B, T) < 0.7, pos_logprobs=-torch.rand(B, T),
                neg_logprobs=-torch.rand(B, T))
    args.update(kw)
    return contrastive_credit(args.pop("advantages"), args.pop("mask"), args.pop("pos_logprobs"), **args)


LAYOUT = SharedPrefixLayout.from_groups([3], [[2]])  # T = 5


def _attention(**kw):
    n = LAYOUT.total_tokens
    args = dict(q=torch.randn(n, 2, 16), k=torch.randn(n, 1, 16), v=torch.randn(n, 1, 16), layout=LAYOUT)
    args.update(kw)
    return shared_prefix_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("layout"), **args)


def _ids(*values):
    return torch.tensor(values, dtype=torch.int64)


def _pack(prompts=None, completions=None, **kw):
    prompts = [_ids(1, 2, 3)] if prompts is None else prompts
    completions = [[_ids(4, 5), _ids(6)]] if completions is None else completions
    return SharedPrefixBatch.pack(prompts, completions, **kw)


def _teacher(**kw):
    args = dict(prompt_ids=[_ids(1, 2)], completion_ids=[_ids(3, 4), _ids(5)], rewards=[1.0, 0.0],
                group_sizes=[2], answer_ids=[_ids(7)], wrong_answer_ids=[None, _ids(8)])
    args.update(kw)
    return build_teacher_inputs(args.pop("prompt_ids"), args.pop("completion_ids"), args.pop("rewards"),
                                args.pop("group_sizes"), args.pop("answer_ids"), args.pop("wrong_answer_ids"),
                                **args)


# --- the catalogue -----------------------------------------------------------------------------------------


TOKEN_LOGPROBS = [
    _case("hidden-list", TypeError, "hidden must be a torch.Tensor", lambda: _logprobs(hidden=[[0.0] * D])),
    _case("weight-ndarray", TypeError, "weight must be a torch.Tensor", lambda: _logprobs(weight=np.ones((V, D)))),
    _case("targets-list", TypeError, "targets must be a torch.Tensor", lambda: _logprobs(targets=[[0] * T] * B)),
    _case("hidden-0d", ValueError, r"hidden must be \[\.\.\., D\]", lambda: _logprobs(hidden=torch.tensor(1.0))),
    _case("weight-1d", ValueError, r"weight must be 2-D \[V, D\]", lambda: _logprobs(weight=torch.randn(V))),
    _case("targets-shape", ValueError, "targets must have hidden's leading shape",
          lambda: _logprobs(targets=torch.randint(0, V, (B, T + 1)))),
    _case("targets-int32", TypeError, "targets must be int64",
          lambda: _logprobs(targets=torch.randint(0, V, (B, T), dtype=torch.int32))),
    _case("hidden-int", TypeError, "hidden must have dtype in",
          lambda: _logprobs(hidden=torch.randint(0, 3, (B, T, D)), weight=torch.randint(0, 3, (V, D)))),
    _case("weight-dtype-mismatch", TypeError, "weight must have hidden's dtype",
          lambda: _logprobs(weight=torch.randn(V, D, dtype=torch.float64))),
    _case("hidden-D-mismatch", ValueError, "hidden's last dim must equal weight's D",
          lambda: _logprobs(hidden=torch.randn(B, T, D + 1))),
    _case("weight-V0", ValueError, "weight must have at least one vocabulary row",
          lambda: _logprobs(weight=torch.randn(0, D), targets=torch.full((B, T), -100))),
    _case("bias-list", TypeError, "bias must be a torch.Tensor", lambda: _logprobs(bias=[0.0] * V)),
    _case("bias-2d", ValueError, r"bias must be 1-D \[V\]", lambda: _logprobs(bias=torch.randn(1, V))),
    _case("bias-length", ValueError, r"bias must be \[V\] with V = 5", lambda: _logprobs(bias=torch.randn(V + 1))),
    _case("bias-int", TypeError, "bias must have dtype in", lambda: _logprobs(bias=torch.arange(V))),
    _case("targets-equal-V", ValueError, r"targets must lie in \[0, 5\).*e\.g\. 5",
          lambda: _logprobs(targets=torch.full((B, T), V))),
    _case("targets-negative", ValueError, r"targets must lie in \[0, 5\).*e\.g\. -1",
          lambda: _logprobs(targets=torch.full((B, T), -1))),
    _case("temperature-zero", ValueError, "temperature must be a finite number > 0", lambda: _logprobs(temperature=0.0)),
    _case("temperature-nan", ValueError, "temperature must be a finite number > 0", lambda: _logprobs(temperature=NAN)),
    _case("temperature-inf", ValueError, "temperature must be a finite number > 0", lambda: _logprobs(temperature=INF)),
    _case("temperature-str", TypeError, "temperature must be a float", lambda: _logprobs(temperature="1.0")),
    _case("softcap-negative", ValueError, "softcap must be a finite number > 0", lambda: _logprobs(softcap=-1.0)),
    _case("softcap-inf", ValueError, "softcap must be a finite number > 0", lambda: _logprobs(softcap=INF)),
    _case("ignore_index-float", TypeError, "ignore_index must be an int", lambda: _logprobs(ignore_index=-100.0)),
    _case("max_scratch_bytes-negative", ValueError, "max_scratch_bytes must be a positive number of bytes",
          lambda: _logprobs(max_scratch_bytes=-1)),
    _case("max_scratch_bytes-float", TypeError, "max_scratch_bytes must be an int", lambda: _logprobs(max_scratch_bytes=1e6)),
    _case("batch_invariant-str", TypeError, "batch_invariant must be a bool", lambda: _logprobs(batch_invariant="no")),
    _case("check_inputs-str", TypeError, "check_inputs must be a bool", lambda: _logprobs(check_inputs="yes")),
    _case("backend-unknown", ValueError, r"backend='gpu' is not a backend", lambda: _logprobs(backend="gpu")),
    pytest.param(lambda: _logprobs(backend="triton"), ValueError, r"backend='triton' needs CUDA tensors",
                 id="backend-triton-on-cpu",
                 marks=pytest.mark.skipif(not HAS_CUDA, reason="interpreted kernels (no CUDA) run CPU tensors")),
]

LOGITS = [
    _case("logits-list", TypeError, "logits must be a torch.Tensor", lambda: _from_logits(logits=[[0.0] * V])),
    _case("logits-0d", ValueError, r"logits must be \[\.\.\., V\]", lambda: _from_logits(logits=torch.tensor(0.0))),
    _case("targets-shape", ValueError, "targets must have logits'?s leading shape",
          lambda: _from_logits(targets=torch.randint(0, V, (B,)))),
    _case("targets-float", TypeError, "targets must be int64", lambda: _from_logits(targets=torch.rand(B, T))),
    _case("logits-int", TypeError, "logits must have dtype in",
          lambda: _from_logits(logits=torch.randint(0, 9, (B, T, V)))),
    _case("logits-V0", ValueError, "logits must have a vocabulary dimension",
          lambda: _from_logits(logits=torch.randn(B, T, 0), targets=torch.full((B, T), -100))),
    _case("targets-out-of-range", ValueError, r"targets must lie in \[0, 5\)",
          lambda: _from_logits(targets=torch.full((B, T), 7))),
    _case("temperature-negative", ValueError, "temperature must be a finite number > 0",
          lambda: _from_logits(temperature=-1.0)),
    _case("temperature-nan", ValueError, "temperature must be a finite number > 0", lambda: _from_logits(temperature=NAN)),
    _case("ignore_index-str", TypeError, "ignore_index must be an int", lambda: _from_logits(ignore_index="-100")),
    _case("max_scratch_bytes-zero", ValueError, "max_scratch_bytes must be a positive number of bytes",
          lambda: _from_logits(max_scratch_bytes=0)),
    _case("check_inputs-str", TypeError, "check_inputs must be a bool", lambda: _from_logits(check_inputs="yes")),
    _case("backend-unknown", ValueError, r"backend='cuda' is not a backend", lambda: _from_logits(backend="cuda")),
]

ADVANTAGES = [
    _case("rewards-list", TypeError, "rewards must be a torch.Tensor", lambda: _advantages(rewards=[1.0, 0.0, 1.0])),
    _case("rewards-2d", ValueError, r"rewards must be 1-D \[B\]", lambda: _advantages(rewards=torch.randn(2, 3))),
    _case("rewards-int", TypeError, "rewards must have dtype in", lambda: _advantages(rewards=torch.arange(6))),
    _case("rewards-nan", ValueError, "rewards must be finite",
          lambda: _advantages(rewards=torch.tensor([1.0, NAN, 0.0, 1.0, 0.0, 0.0]))),
    _case("rewards-inf", ValueError, "rewards must be finite",
          lambda: _advantages(rewards=torch.tensor([1.0, 0.0, 0.0, -INF, 0.0, 0.0]))),
    _case("group_size-and-group_sizes", ValueError, "exactly one of group_size, group_sizes and group_ids.*got both",
          lambda: _advantages(group_sizes=[3, 3])),
    _case("neither-group_size", ValueError, "exactly one of group_size, group_sizes and group_ids.*got none",
          lambda: _advantages(group_size=None)),
    _case("group_size-zero", ValueError, "group_size must be >= 1", lambda: _advantages(group_size=0)),
    _case("group_size-float", TypeError, "group_size must be an int", lambda: _advantages(group_size=3.0)),
    _case("group_size-not-dividing", ValueError, "multiple of group_size = 4", lambda: _advantages(group_size=4)),
    _case("group_sizes-zero", ValueError, "group_sizes must all be >= 1",
          lambda: _advantages(group_size=None, group_sizes=[6, 0])),
    _case("group_sizes-sum", ValueError, "group_sizes must sum to rewards' length B = 6",
          lambda: _advantages(group_size=None, group_sizes=[2, 2])),
    _case("group_sizes-float-tensor", TypeError, "group_sizes must hold integers",
          lambda: _advantages(group_size=None, group_sizes=torch.tensor([3.0, 3.0]))),
    _case("group_sizes-float-element", TypeError, "group_sizes must hold ints",
          lambda: _advantages(group_size=None, group_sizes=[3, 3.0])),
    _case("group_sizes-str", TypeError, "group_sizes must be a 1-D integer tensor or a sequence",
          lambda: _advantages(group_size=None, group_sizes="33")),
    _case("group_sizes-2d", ValueError, "group_sizes must be 1-D",
          lambda: _advantages(group_size=None, group_sizes=torch.tensor([[3, 3]]))),
    _case("mode-unknown", ValueError, "mode must be one of", lambda: _advantages(mode="gpro")),
    _case("eps-negative", ValueError, "eps must be a finite number >= 0", lambda: _advantages(eps=-1e-6)),
    _case("eps-nan", ValueError, "eps must be a finite number >= 0", lambda: _advantages(eps=NAN)),
    _case("eps-str", TypeError, "eps must be a float", lambda: _advantages(eps="1e-6")),
    _case("backend-unknown", ValueError, r"backend='numpy' is not a backend", lambda: _advantages(backend="numpy")),
]


POLICY_LOSS = [
    _case("config-dict", TypeError, "config must be a rlloss.LossConfig", lambda: _policy(config={"beta": 0.0})),
    _case("config-preset-name", TypeError, "config must be a rlloss.LossConfig", lambda: _policy(config="dapo")),
    _case("logprobs-list", TypeError, "logprobs must be a torch.Tensor", lambda: _policy(logprobs=[[0.0] * T] * B)),
    _case("logprobs-1d", ValueError, r"logprobs must be 2-D \[B, T\]", lambda: _policy(logprobs=-torch.rand(B * T))),
    _case("logprobs-int", TypeError, "logprobs must have dtype in",
          lambda: _policy(logprobs=torch.zeros(B, T, dtype=torch.int64))),
    _case("old_logprobs-shape", ValueError, "old_logprobs must have logprobs'?s shape",
          lambda: _policy(old_logprobs=-torch.rand(B, T + 1))),
    _case("old_logprobs-int", TypeError, "old_logprobs must have dtype in",
          lambda: _policy(old_logprobs=torch.zeros(B, T, dtype=torch.int32))),
    _case("advantages-shape", ValueError, r"advantages must be \[B\]", lambda: _policy(advantages=torch.randn(B + 1))),
    _case("advantages-int", TypeError, "advantages must have dtype in",
          lambda: _policy(advantages=torch.ones(B, dtype=torch.int64))),
    _case("mask-list", TypeError, "mask must be a torch.Tensor", lambda: _policy(mask=[[True] * T] * B)),
    _case("mask-shape", ValueError, "mask must have logprobs' shape", lambda: _policy(mask=torch.ones(B, T + 1))),
    _case("mask-values", ValueError, "mask must hold only 0 and 1", lambda: _policy(mask=torch.full((B, T), 2.0))),
    _case("mask-complex", TypeError, "mask must be bool or a real 0/1 tensor",
          lambda: _policy(mask=torch.ones(B, T, dtype=torch.complex64))),
    _case("ref_logprobs-missing", ValueError, "ref_logprobs is required when config.beta",
          lambda: _policy(config=LossConfig(beta=0.04))),
    _case("ref_logprobs-shape", ValueError, "ref_logprobs must have logprobs'?s shape",
          lambda: _policy(config=LossConfig(beta=0.04), ref_logprobs=-torch.rand(T, B))),
    _case("entropy-missing", ValueError, "entropy is required when config.entropy_coef",
          lambda: _policy(config=LossConfig(entropy_coef=0.01))),
    _case("entropy-shape", ValueError, "entropy must have logprobs'?s shape", lambda: _policy(entropy=torch.rand(B))),
    _case("rollout_logprobs-missing", ValueError, "rollout_logprobs is required when config.rollout_correction",
          lambda: _policy(config=LossConfig(rollout_correction="token_truncate"))),
    _case("pos_logprobs-missing", ValueError, "pos_logprobs .* is required when config.credit",
          lambda: _policy(config=LossConfig(credit="cepo"))),
    _case("neg_logprobs-missing", ValueError, "neg_logprobs .* is required when config.credit = 'cepo'",
          lambda: _policy(config=LossConfig(credit="cepo"), pos_logprobs=-torch.rand(B, T))),
    _case("pos_logprobs-without-credit", ValueError, "pos_logprobs was given but config.credit is None",
          lambda: _policy(pos_logprobs=-torch.rand(B, T))),
    _case("num_items_in_batch-zero", ValueError, "num_items_in_batch must be a finite number > 0",
          lambda: _policy(num_items_in_batch=0)),
    _case("num_items_in_batch-negative-tensor", ValueError, "num_items_in_batch must be a finite number > 0",
          lambda: _policy(num_items_in_batch=torch.tensor(-3))),
    _case("num_items_in_batch-nan", ValueError, "num_items_in_batch must be a finite number > 0",
          lambda: _policy(num_items_in_batch=NAN)),
    _case("num_items_in_batch-inf", ValueError, "num_items_in_batch must be a finite number > 0",
          lambda: _policy(num_items_in_batch=INF)),
    _case("num_items_in_batch-nan-tensor", ValueError, "num_items_in_batch must be a finite number > 0",
          lambda: _policy(num_items_in_batch=torch.tensor(NAN))),
    _case("num_items_in_batch-inf-tensor", ValueError, "num_items_in_batch must be a finite number > 0",
          lambda: _policy(num_items_in_batch=torch.tensor(INF))),
    _case("num_items_in_batch-str", TypeError, "num_items_in_batch must be an int or a 0-d tensor",
          lambda: _policy(num_items_in_batch="12")),
    _case("num_items_in_batch-vector", ValueError, "num_items_in_batch must be an int or a 0-d tensor",
          lambda: _policy(num_items_in_batch=torch.tensor([3, 3]))),
    _case("num_items_in_batch-zero-reference", ValueError, "num_items_in_batch",
          lambda: _policy(num_items_in_batch=0, backend="reference")),
    _case("num_sequences_in_batch-inf-tensor", ValueError, "num_sequences_in_batch must be a finite number > 0",
          lambda: _policy(config=LossConfig.preset("grpo"), num_sequences_in_batch=torch.tensor(INF))),
    _case("num_sequences_in_batch-zero", ValueError, "num_sequences_in_batch must be a finite number > 0",
          lambda: _policy(config=LossConfig.preset("grpo"), num_sequences_in_batch=0)),
    _case("backend-unknown", ValueError, r"backend='Torch' is not a backend", lambda: _policy(backend="Torch")),
    _case("check_inputs-str", TypeError, "check_inputs must be a bool", lambda: _policy(check_inputs="yes")),
    _case("rollout_weights-shape", ValueError, "rollout_weights must have logprobs'?s shape",
          lambda: _policy(rollout_weights=torch.rand(B))),
    _case("rollout_weights-int", TypeError, "rollout_weights must have dtype",
          lambda: _policy(rollout_weights=torch.ones(B, T, dtype=torch.long))),
    _case("rollout_weights-and-correction", ValueError, "rollout_weights and config.rollout_correction",
          lambda: _policy(config=LossConfig(rollout_correction="token_mask"), rollout_logprobs=-torch.rand(B, T),
                          rollout_weights=torch.rand(B, T))),
    _case("rollout_logprobs-missing-rs", ValueError, "rollout_logprobs is required when config.rollout_rs",
          lambda: _policy(config=LossConfig(rollout_rs="token_k2", rollout_rs_threshold=0.1))),
]

FUSED = [
    _case("config-none", TypeError, "config must be a rlloss.LossConfig", lambda: FusedPolicyLoss(None)),
    _case("ctor-softcap-negative", ValueError, "softcap must be a finite number > 0",
          lambda: FusedPolicyLoss(LossConfig(), softcap=-1.0)),
    _case("ctor-softcap-str", TypeError, "softcap must be a float", lambda: FusedPolicyLoss(LossConfig(), softcap="2")),
    _case("ctor-backend-unknown", ValueError, r"backend='gpu' is not a backend",
          lambda: FusedPolicyLoss(LossConfig(), backend="gpu")),
    _case("ctor-max_scratch_bytes-zero", ValueError, "max_scratch_bytes must be a positive number of bytes",
          lambda: FusedPolicyLoss(LossConfig(), max_scratch_bytes=0)),
    _case("ctor-batch_invariant-int", TypeError, "batch_invariant must be a bool",
          lambda: FusedPolicyLoss(LossConfig(), batch_invariant=1)),
    _case("ctor-check_inputs-str", TypeError, "check_inputs must be a bool",
          lambda: FusedPolicyLoss(LossConfig(), check_inputs="yes")),
    _case("hidden-2d", ValueError, r"hidden must be 3-D \[B, T, D\]", lambda: _fused(hidden=torch.randn(B * T, D))),
    _case("hidden-list", TypeError, "hidden must be a torch.Tensor", lambda: _fused(hidden=[[[0.0] * D] * T] * B)),
    _case("targets-shape", ValueError, r"targets must be \[B, T\]", lambda: _fused(targets=torch.randint(0, V, (B,)))),
    _case("targets-int32", TypeError, "targets must be int64",
          lambda: _fused(targets=torch.randint(0, V, (B, T), dtype=torch.int32))),
    _case("targets-out-of-range", ValueError, r"targets must lie in \[0, 5\)",
          lambda: _fused(targets=torch.full((B, T), V))),
    _case("weight-dtype-mismatch", TypeError, "weight must have hidden's dtype",
          lambda: _fused(weight=torch.randn(V, D, dtype=torch.float64))),
    _case("mask-shape", ValueError, "mask must have logprobs' shape",
          lambda: _fused(mask=torch.ones(B, T - 1, dtype=torch.bool))),
    _case("temperature-zero", ValueError, "temperature must be a finite number > 0",
          lambda: FusedPolicyLoss(LossConfig(), temperature=0)),
    _case("temperature-inf", ValueError, "temperature must be a finite number > 0",
          lambda: FusedPolicyLoss(LossConfig(), temperature=INF)),
    _case("rollout_weights-shape", ValueError, "rollout_weights must have logprobs'?s shape",
          lambda: _fused(rollout_weights=torch.rand(B, T + 1))),
    _case("rollout_rs-on-policy", ValueError, "fused_policy_loss needs old_logprobs with config.rollout_rs",
          lambda: FusedPolicyLoss(LossConfig(rollout_rs="token_k2", rollout_rs_threshold=0.1))(
              torch.randn(B, T, D), torch.randn(V, D), torch.randint(0, V, (B, T)), torch.ones(B, T, dtype=torch.bool),
              torch.randn(B), rollout_logprobs=-torch.rand(B, T))),
    _case("rollout_is_batch_normalize-on-policy", ValueError,
          "fused_policy_loss needs old_logprobs with config.rollout_is_batch_normalize",
          lambda: FusedPolicyLoss(LossConfig(rollout_correction="token_truncate", rollout_is_batch_normalize=True))(
              torch.randn(B, T, D), torch.randn(V, D), torch.randint(0, V, (B, T)), torch.ones(B, T, dtype=torch.bool),
              torch.randn(B), rollout_logprobs=-torch.rand(B, T))),
]


def _fused_fn(**kw):
    """fused_policy_loss: the same checks as the module's, in policy_loss's argument order."""
    args = dict(hidden=torch.randn(B, T, D), weight=torch.randn(V, D), targets=torch.randint(0, V, (B, T)),
                old_logprobs=None, advantages=torch.randn(B), mask=torch.ones(B, T, dtype=torch.bool),
                config=LossConfig())
    args.update(kw)
    return fused_policy_loss(args.pop("hidden"), args.pop("weight"), args.pop("targets"), args.pop("old_logprobs"),
                             args.pop("advantages"), args.pop("mask"), **args)


FUSED_FUNCTIONAL = [
    _case("config-none", TypeError, "config must be a rlloss.LossConfig", lambda: _fused_fn(config=None)),
    _case("temperature-zero", ValueError, "temperature must be a finite number > 0", lambda: _fused_fn(temperature=0)),
    _case("softcap-negative", ValueError, "softcap must be a finite number > 0", lambda: _fused_fn(softcap=-1.0)),
    _case("backend-unknown", ValueError, r"backend='gpu' is not a backend", lambda: _fused_fn(backend="gpu")),
    _case("check_inputs-str", TypeError, "check_inputs must be a bool", lambda: _fused_fn(check_inputs="yes")),
    _case("old_logprobs-shape", ValueError, "old_logprobs must have logprobs'?s shape",
          lambda: _fused_fn(old_logprobs=-torch.rand(B, T + 1))),
    _case("advantages-in-mask-place", ValueError, "mask must have logprobs' shape",
          lambda: _fused_fn(mask=torch.ones(B, dtype=torch.bool))),
    _case("targets-out-of-range", ValueError, r"targets must lie in \[0, 5\)",
          lambda: _fused_fn(targets=torch.full((B, T), V))),
]


LOSS_CONFIG = [
    _case("loss_mode", ValueError, "LossConfig.loss_mode must be one of", lambda: LossConfig(loss_mode="ppo")),
    _case("importance_sampling_level", ValueError, "LossConfig.importance_sampling_level must be one of",
          lambda: LossConfig(importance_sampling_level="seq")),
    _case("kl_estimator", ValueError, "LossConfig.kl_estimator must be one of", lambda: LossConfig(kl_estimator="k4")),
    _case("aggregation", ValueError, "LossConfig.aggregation must be one of", lambda: LossConfig(aggregation="mean")),
    _case("rollout_correction", ValueError, "LossConfig.rollout_correction must be one of",
          lambda: LossConfig(rollout_correction="truncate")),
    _case("credit", ValueError, "LossConfig.credit must be one of", lambda: LossConfig(credit="grpo")),
    _case("kl_clamp-int", TypeError, "LossConfig.kl_clamp must be a bool", lambda: LossConfig(kl_clamp=1)),
    _case("epsilon_low-range", ValueError, r"LossConfig.epsilon_low must lie in \[0, 1\]",
          lambda: LossConfig(epsilon_low=1.5)),
    _case("epsilon_high-nan", ValueError, "LossConfig.epsilon_high must be finite", lambda: LossConfig(epsilon_high=NAN)),
    _case("epsilon_low-str", TypeError, "LossConfig.epsilon_low must be a number", lambda: LossConfig(epsilon_low="0.2")),
    _case("beta-negative", ValueError, "LossConfig.beta must be >= 0", lambda: LossConfig(beta=-0.1)),
    _case("beta-inf", ValueError, "LossConfig.beta must be finite", lambda: LossConfig(beta=INF)),
    _case("entropy_coef-nan", ValueError, "LossConfig.entropy_coef must be finite", lambda: LossConfig(entropy_coef=NAN)),
    _case("delta-below-one", ValueError, "LossConfig.delta must be > 1", lambda: LossConfig(delta=0.5)),
    _case("delta-wrong-mode", ValueError, "LossConfig.delta applies to loss_mode='ppo_clip' only",
          lambda: LossConfig(loss_mode="gpg", delta=2.0)),
    _case("dual_clip-below-one", ValueError, "LossConfig.dual_clip must be > 1", lambda: LossConfig(dual_clip=0.9)),
    _case("sapo_tau_pos-zero", ValueError, "LossConfig.sapo_tau_pos must be > 0", lambda: LossConfig(sapo_tau_pos=0.0)),
    _case("log_ratio-order", ValueError, "LossConfig.log_ratio_min must be < log_ratio_max",
          lambda: LossConfig(log_ratio_min=1.0, log_ratio_max=-1.0)),
    _case("log_ratio_max-inf", ValueError, "LossConfig.log_ratio_max must be finite",
          lambda: LossConfig(log_ratio_max=INF)),
    _case("rollout_threshold_high-zero", ValueError, "LossConfig.rollout_threshold_high must be > 0",
          lambda: LossConfig(rollout_threshold_high=0.0)),
    _case("rollout_threshold_low-above-high", ValueError, "LossConfig.rollout_threshold_low must lie in",
          lambda: LossConfig(rollout_threshold_low=3.0)),
    _case("max_completion_length-zero", ValueError, "LossConfig.max_completion_length must be > 0",
          lambda: LossConfig(max_completion_length=0)),
    _case("max_completion_length-float", TypeError, "LossConfig.max_completion_length must be an int",
          lambda: LossConfig(max_completion_length=256.0)),
    _case("credit_lambda-range", ValueError, r"LossConfig.credit_lambda must lie in \[0, 1\]",
          lambda: LossConfig(credit_lambda=2.0)),
    _case("credit_eps_w-one", ValueError, r"LossConfig.credit_eps_w must lie in \[0, 1\)",
          lambda: LossConfig(credit_eps_w=1.0)),
    _case("replace-bad-value", ValueError, "LossConfig.beta must be >= 0", lambda: LossConfig().replace(beta=-1.0)),
    _case("preset-unknown", ValueError, "unknown preset 'ppo'", lambda: LossConfig.preset("ppo")),
    _case("preset-unknown-override", ValueError, r"unknown LossConfig field\(s\) in overrides: \['epsilon'\]",
          lambda: LossConfig.preset("grpo", epsilon=0.3)),
    _case("preset-dr_grpo-needs-length", ValueError, "needs max_completion_length",
          lambda: LossConfig.preset("dr_grpo")),
    _case("preset-bad-override-value", ValueError, "LossConfig.epsilon_low must lie in",
          lambda: LossConfig.preset("dapo", epsilon_low=-0.1)),
    _case("preset-name-list", TypeError, "preset name must be a str", lambda: LossConfig.preset(["grpo"])),
    _case("dro_beta-missing", ValueError, "LossConfig.dro_beta is required when loss_mode='dro'",
          lambda: LossConfig.preset("verl_dro")),
    _case("dro_beta-zero", ValueError, "LossConfig.dro_beta must be > 0", lambda: LossConfig(dro_beta=0.0)),
    _case("clip_cov_ratio-zero", ValueError, r"LossConfig.clip_cov_ratio must lie in \(0, 1\]",
          lambda: LossConfig(clip_cov_ratio=0.0)),
    _case("kl_cov_ratio-str", TypeError, "LossConfig.kl_cov_ratio must be a number", lambda: LossConfig(kl_cov_ratio="1")),
    _case("clip_cov-bounds", ValueError, "LossConfig.clip_cov_lb must be < clip_cov_ub",
          lambda: LossConfig(clip_cov_lb=5.0, clip_cov_ub=1.0)),
    _case("kl_cov_coef-nan", ValueError, "LossConfig.kl_cov_coef must be finite", lambda: LossConfig(kl_cov_coef=NAN)),
    _case("dppo_ratio_cap-zero", ValueError, "LossConfig.dppo_ratio_cap must be > 0",
          lambda: LossConfig(dppo_ratio_cap=0.0)),
    _case("vespo_k_pos-inf", ValueError, "LossConfig.vespo_k_pos must be finite", lambda: LossConfig(vespo_k_pos=INF)),
    _case("geo_mean-sequence-level", ValueError, "loss_mode='geo_mean' forms its own sequence ratio",
          lambda: LossConfig(loss_mode="geo_mean", importance_sampling_level="sequence")),
    _case("geo_mean-credit", ValueError, "LossConfig.credit is not available with loss_mode='geo_mean'",
          lambda: LossConfig(loss_mode="geo_mean", credit="cepo")),
    _case("vespo-sequence-rollout", ValueError, "loss_mode='vespo' folds token-level rollout weights",
          lambda: LossConfig(loss_mode="vespo", rollout_correction="sequence_mask")),
    _case("rollout_is_batch_normalize-int", TypeError, "LossConfig.rollout_is_batch_normalize must be a bool",
          lambda: LossConfig(rollout_is_batch_normalize=1)),
    _case("rollout_is_batch_normalize-alone", ValueError, "rollout_is_batch_normalize needs a rollout_correction",
          lambda: LossConfig(rollout_is_batch_normalize=True)),
    _case("rollout_rs-unknown", ValueError, "LossConfig.rollout_rs must be one of",
          lambda: LossConfig(rollout_rs="token_k4", rollout_rs_threshold=1.0)),
    _case("rollout_rs-list", TypeError, "LossConfig.rollout_rs must be a str",
          lambda: LossConfig(rollout_rs=["token_k1"], rollout_rs_threshold=1.0)),
    _case("rollout_rs_threshold-missing", ValueError, "LossConfig.rollout_rs_threshold is required",
          lambda: LossConfig(rollout_rs="token_k1")),
    _case("rollout_rs_threshold-without-rs", ValueError, "rollout_rs_threshold is set but rollout_rs is None",
          lambda: LossConfig(rollout_rs_threshold=1.0)),
    _case("rollout_rs_threshold-count", ValueError, "must give one bound or one per rollout_rs option",
          lambda: LossConfig(rollout_rs="token_k1,token_k2,seq_sum_k3", rollout_rs_threshold="2,0.1")),
    _case("rollout_rs_threshold-k2-pair", ValueError, "is not a bound for 'token_k2'",
          lambda: LossConfig(rollout_rs="token_k2", rollout_rs_threshold="0.1_0.2")),
    _case("rollout_rs_threshold-order", ValueError, "rollout_rs_threshold for 'token_k1' must be positive",
          lambda: LossConfig(rollout_rs="token_k1", rollout_rs_threshold="2_1")),
    _case("rollout_rs_threshold-bool", TypeError, "LossConfig.rollout_rs_threshold must be a number or a str",
          lambda: LossConfig(rollout_rs="token_k1", rollout_rs_threshold=True)),
]

CREDIT = [
    _case("credit-unknown", ValueError, "credit must be one of", lambda: _credit(credit="ppo")),
    _case("credit_lambda-range", ValueError, r"credit_lambda must lie in \[0, 1\]", lambda: _credit(credit_lambda=1.5)),
    _case("credit_lambda-nan", ValueError, "credit_lambda must be finite", lambda: _credit(credit_lambda=NAN)),
    _case("credit_lambda-str", TypeError, "credit_lambda must be a number", lambda: _credit(credit_lambda="0.5")),
    _case("credit_eps_w-one", ValueError, r"credit_eps_w must lie in \[0, 1\)", lambda: _credit(credit_eps_w=1.0)),
    _case("credit_eps_w-inf", ValueError, "credit_eps_w must be finite", lambda: _credit(credit_eps_w=INF)),
    _case("mask-list", TypeError, "mask must be a torch.Tensor", lambda: _credit(mask=[[1] * T] * B)),
    _case("mask-1d", ValueError, r"mask must be 2-D \[B, T\]", lambda: _credit(mask=torch.ones(B, dtype=torch.bool))),
    _case("mask-values", ValueError, "mask must hold only 0 and 1", lambda: _credit(mask=torch.full((B, T), -1))),
    _case("advantages-shape", ValueError, r"advantages must be \[B\]", lambda: _credit(advantages=torch.randn(T))),
    _case("advantages-int", TypeError, "advantages must have dtype in",
          lambda: _credit(advantages=torch.ones(B, dtype=torch.int64))),
    _case("pos_logprobs-shape", ValueError, "pos_logprobs must have mask's shape",
          lambda: _credit(pos_logprobs=-torch.rand(B, T, 1))),
    _case("pos_logprobs-int", TypeError, "pos_logprobs must have dtype in",
          lambda: _credit(pos_logprobs=torch.zeros(B, T, dtype=torch.int64))),
    _case("neg_logprobs-missing", ValueError, "credit='cepo' needs neg_logprobs", lambda: _credit(neg_logprobs=None)),
    _case("base_logprobs-with-cepo", ValueError, "base_logprobs is the denominator of credit='rlsd'",
          lambda: _credit(base_logprobs=-torch.rand(B, T))),
    _case("base_logprobs-missing", ValueError, "credit='rlsd' needs base_logprobs",
          lambda: _credit(credit="rlsd", neg_logprobs=None)),
    _case("neg_logprobs-with-rlsd", ValueError, "neg_logprobs is for credit='cepo'",
          lambda: _credit(credit="rlsd", base_logprobs=-torch.rand(B, T))),
    _case("base_logprobs-shape", ValueError, "base_logprobs must have mask's shape",
          lambda: _credit(credit="rlsd", neg_logprobs=None, base_logprobs=-torch.rand(B))),
    _case("backend-unknown", ValueError, r"backend='fast' is not a backend", lambda: _credit(backend="fast")),
]

LINEAR_DECAY = [
    _case("start-range", ValueError, r"LinearDecay.start must lie in \[0, 1\]", lambda: LinearDecay(1.5, 10)),
    _case("start-nan", ValueError, r"LinearDecay.start must lie in \[0, 1\]", lambda: LinearDecay(NAN, 10)),
    _case("start-str", TypeError, "LinearDecay.start must be a number", lambda: LinearDecay("0.5", 10)),
    _case("steps-negative", ValueError, "LinearDecay.steps must be >= 0", lambda: LinearDecay(0.5, -1)),
    _case("steps-float", TypeError, "LinearDecay.steps must be an int", lambda: LinearDecay(0.5, 25.0)),
    _case("call-step-negative", ValueError, "step must be >= 0", lambda: LinearDecay(0.5, 10)(-1)),
    _case("call-step-float", TypeError, "step must be an int", lambda: LinearDecay(0.5, 10)(1.5)),
]


ATTENTION = [
    _case("q-list", TypeError, "q must be a torch.Tensor", lambda: _attention(q=[[[0.0]]])),
    _case("layout-tuple", TypeError, "layout must be a rlloss.SharedPrefixLayout", lambda: _attention(layout=(3, 2))),
    _case("q-2d", ValueError, r"q must be 3-D \[T, Hq, d\]", lambda: _attention(q=torch.randn(5, 32))),
    _case("v-2d", ValueError, r"v must be 3-D \[T, Hkv, d\]", lambda: _attention(v=torch.randn(5, 16))),
    _case("q-rows", ValueError, r"q must have layout.total_tokens = 5 rows, got 6",
          lambda: _attention(q=torch.randn(6, 2, 16))),
    _case("k-shape", ValueError, r"k and v must both be \[T, Hkv, d\]", lambda: _attention(k=torch.randn(5, 1, 8))),
    _case("heads-not-multiple", ValueError, "q's heads Hq = 2 must be a multiple of k's heads Hkv = 3",
          lambda: _attention(k=torch.randn(5, 3, 16), v=torch.randn(5, 3, 16))),
    _case("q-int", TypeError, "q must have dtype in", lambda: _attention(q=torch.ones(5, 2, 16, dtype=torch.int64))),
    _case("k-dtype-mismatch", TypeError, "k and v must have q's dtype",
          lambda: _attention(k=torch.randn(5, 1, 16, dtype=torch.float64))),
    _case("scale-zero", ValueError, "scale must be a finite number > 0", lambda: _attention(scale=0.0)),
    _case("scale-nan", ValueError, "scale must be a finite number > 0", lambda: _attention(scale=NAN)),
    _case("scale-str", TypeError, "scale must be a float", lambda: _attention(scale="0.25")),
    _case("backend-unknown", ValueError, r"backend='flash' is not a backend", lambda: _attention(backend="flash")),
    _case("head-dim-zero", ValueError, "d",
          lambda: _attention(q=torch.randn(5, 2, 0), k=torch.randn(5, 1, 0), v=torch.randn(5, 1, 0))),
    _case("kv-heads-zero", ValueError, "Hkv",
          lambda: _attention(k=torch.randn(5, 0, 16), v=torch.randn(5, 0, 16))),
]

LAYOUT_CASES = [
    _case("parents-out-of-range", ValueError, r"parents\[2\] must be -1 \(a root\) or a segment index in \[0, 3\), got 5",
          lambda: SharedPrefixLayout((0, 2, 4), (2, 2, 2), (-1, 0, 5))),
    _case("parents-below-minus-one", ValueError, r"parents\[0\] must be -1 \(a root\)",
          lambda: SharedPrefixLayout((0, 2), (2, 2), (-2, 0))),
    _case("parents-cycle", ValueError, r"parents\[1\] .* cycle 1 → 2 → 1",
          lambda: SharedPrefixLayout((0, 2, 4), (2, 2, 2), (-1, 2, 1))),
    _case("parents-self-loop", ValueError, r"parents\[1\] .* cycle 1 → 1", lambda: SharedPrefixLayout.from_tree([2, 2], [-1, 1])),
    _case("parent-after-child", ValueError, r"parents\[1\] must be -1 or an earlier segment \(< 1\), got 2",
          lambda: SharedPrefixLayout((0, 2, 4), (2, 2, 2), (-1, 2, -1))),
    _case("starts-inconsistent", ValueError, r"starts\[1\] must be 2.*got 3",
          lambda: SharedPrefixLayout((0, 3, 4), (2, 2, 2), (-1, 0, 0))),
    _case("starts-not-from-zero", ValueError, r"starts\[0\] must be 0", lambda: SharedPrefixLayout((1, 3), (2, 2), (-1, 0))),
    _case("starts-negative", ValueError, r"starts\[0\] must be >= 0", lambda: SharedPrefixLayout((-2, 0), (2, 2), (-1, 0))),
    _case("entries-mismatched", ValueError, "starts, lengths and parents must have one entry per segment",
          lambda: SharedPrefixLayout((0, 2), (2, 2), (-1,))),
    _case("lengths-zero", ValueError, r"lengths\[1\] must be >= 1", lambda: SharedPrefixLayout((0, 2), (2, 0), (-1, 0))),
    _case("lengths-empty", ValueError, "at least one segment", lambda: SharedPrefixLayout((), (), ())),
    _case("lengths-float-direct", TypeError, r"lengths\[0\] must be an int, got float",
          lambda: SharedPrefixLayout((0, 3), (3.0, 2), (-1, 0))),
    _case("from_tree-lengths-float", TypeError, r"lengths\[0\] must be an int, got float 3.5",
          lambda: SharedPrefixLayout.from_tree([3.5, 2], [-1, 0])),
    _case("from_tree-parents-bool", TypeError, r"parents\[1\] must be an int, got bool",
          lambda: SharedPrefixLayout.from_tree([3, 2], [-1, False])),
    _case("from_tree-lengths-str", TypeError, "lengths must be a sequence of ints, got str",
          lambda: SharedPrefixLayout.from_tree("32", [-1, 0])),
    _case("from_tree-lengths-float-tensor", TypeError, r"lengths\[0\] must be an int",
          lambda: SharedPrefixLayout.from_tree(torch.tensor([3.0, 2.0]), [-1, 0])),
    _case("from_tree-lengths-2d", ValueError, "lengths must be 1-D",
          lambda: SharedPrefixLayout.from_tree(torch.tensor([[3, 2]]), [-1, 0])),
    _case("from_tree-mismatched", ValueError, "lengths and parents must have one entry per segment",
          lambda: SharedPrefixLayout.from_tree([3, 2], [-1])),
    _case("from_groups-prompt-float", TypeError, r"prompt_lengths\[0\] must be an int",
          lambda: SharedPrefixLayout.from_groups([2.5], [[3]])),
    _case("from_groups-completion-zero", ValueError, r"completion_lengths\[0\]\[1\] must be >= 1",
          lambda: SharedPrefixLayout.from_groups([2], [[1, 0]])),
    _case("from_groups-completions-int", TypeError, r"completion_lengths\[0\] must be a sequence of ints",
          lambda: SharedPrefixLayout.from_groups([2], [3])),
    _case("from_groups-no-completions", ValueError, "group 0 has no completions",
          lambda: SharedPrefixLayout.from_groups([2], [[]])),
    _case("from_groups-mismatched", ValueError, "prompt_lengths and completion_lengths must have one entry per group",
          lambda: SharedPrefixLayout.from_groups([2, 3], [[1]])),
    _case("device-float", TypeError, "device must be a torch.device", lambda: SharedPrefixLayout((0,), (2,), (-1,), 1.5)),
    _case("device-unknown", ValueError, "device must be a torch.device or a device string",
          lambda: SharedPrefixLayout.from_tree([2], [-1], device="gpu")),
    _case("ancestors-negative", ValueError, r"segment must lie in \[0, 2\), got -1", lambda: LAYOUT.ancestors(-1)),
    _case("descendants-past-end", ValueError, r"segment must lie in \[0, 2\), got 2", lambda: LAYOUT.descendants(2)),
    _case("tables-block-zero", ValueError, "block must be >= 1", lambda: LAYOUT.tables(0)),
    _case("tables-block-float", TypeError, "block must be an int", lambda: LAYOUT.tables(16.0)),
    _case("attention_flops-head_dim", ValueError, "head_dim must be >= 1", lambda: LAYOUT.attention_flops(0, 2)),
]



PREFIX_BATCH = [
    _case("completion-negative-id", ValueError, r"completion_ids\[0\]\[0\] must hold token ids >= 0.*got -1",
          lambda: _pack(completions=[[_ids(4, -1), _ids(6)]])),
    _case("prompt-ignore-index", ValueError, r"prompt_ids\[0\] must hold token ids >= 0.*got -100",
          lambda: _pack(prompts=[_ids(-100, 2)])),
    _case("prompt-float", TypeError, r"prompt_ids\[0\] must have dtype int64, got float32",
          lambda: _pack(prompts=[torch.tensor([1.0, 2.0])])),
    _case("completion-int32", TypeError, r"completion_ids\[0\]\[1\] must have dtype int64, got int32",
          lambda: _pack(completions=[[_ids(4), torch.tensor([5], dtype=torch.int32)]])),
    _case("prompt_ids-tensor", TypeError, "prompt_ids must be a list of 1-D tensors", lambda: _pack(prompts=_ids(1, 2))),
    _case("prompt-list-of-ints", TypeError, r"prompt_ids\[0\] must be a 1-D torch.Tensor", lambda: _pack(prompts=[[1, 2]])),
    _case("prompt-2d", ValueError, r"prompt_ids\[0\] must be a 1-D tensor", lambda: _pack(prompts=[_ids(1, 2)[None]])),
    _case("prompt-empty", ValueError, r"prompt_ids\[0\] is empty", lambda: _pack(prompts=[_ids()])),
    _case("prompt_ids-empty", ValueError, "prompt_ids is empty", lambda: _pack(prompts=[], completions=[])),
    _case("completion_ids-count", ValueError, "completion_ids must hold one list per prompt",
          lambda: _pack(completions=[[_ids(4)], [_ids(5)]])),
    _case("completion_ids-group-empty", ValueError, r"completion_ids\[0\] is empty", lambda: _pack(completions=[[]])),
    _case("gather_hidden-rows", ValueError, r"hidden must be \[1, T, \.\.\.\] or \[T, \.\.\.\] with T = 6",
          lambda: _pack().gather_hidden(torch.randn(5, 4))),
    _case("gather_hidden-list", TypeError, "hidden must be a torch.Tensor", lambda: _pack().gather_hidden([0.0] * 6)),
    _case("unpack-shape", ValueError, r"values must be \[C, S_max, \.\.\.\]", lambda: _pack().unpack(torch.randn(3, 2))),
    _case("unpack-list", TypeError, "values must be a torch.Tensor", lambda: _pack().unpack([[0.0]])),
    _case("device-unknown", ValueError, "device must be a torch.device or a device string", lambda: _pack(device="gpu")),
]

TEACHER = [
    _case("credit-unknown", ValueError, "credit must be one of", lambda: _teacher(credit="grpo")),
    _case("fallback-unknown", ValueError, "fallback must be one of", lambda: _teacher(fallback="skip")),
    _case("packed-str", TypeError, "packed must be a bool", lambda: _teacher(packed="yes")),
    _case("rewards-nan", ValueError, "rewards must be finite", lambda: _teacher(rewards=[1.0, NAN])),
    _case("group_sizes-sum", ValueError, "group_sizes must sum to rewards' length B = 2", lambda: _teacher(group_sizes=[3])),
    _case("prompt_ids-count", ValueError, "prompt_ids must have 1 entries, got 2",
          lambda: _teacher(prompt_ids=[_ids(1), _ids(2)])),
    _case("completion_ids-int32", TypeError, r"completion_ids\[1\] must be a 1-D int64 tensor",
          lambda: _teacher(completion_ids=[_ids(3, 4), torch.tensor([5], dtype=torch.int32)])),
    _case("completion_ids-tensor", TypeError, "completion_ids must be a list of 1-D int64 tensors",
          lambda: _teacher(completion_ids=_ids(3, 4))),
    _case("answer_ids-empty", ValueError, r"answer_ids\[0\] must hold at least one token", lambda: _teacher(answer_ids=[_ids()])),
    _case("wrong_answer_ids-missing", ValueError, "credit='cepo' needs wrong_answer_ids",
          lambda: _teacher(wrong_answer_ids=None)),
    _case("advantages-shape", ValueError, r"advantages must be \[B\] = \(2,\)", lambda: _teacher(advantages=torch.randn(3))),
    _case("reject_below-nan", TypeError, "reject_below must be a finite number", lambda: _teacher(reject_below=NAN)),
    _case("completion_length-short", ValueError, "completion_length must be >= the longest completion",
          lambda: _teacher(completion_length=1)),
    _case("completion_length-float", TypeError, "completion_length must be an int", lambda: _teacher(completion_length=4.0)),
    _case("answer_prefix_ids-float", TypeError, "answer_prefix_ids must be a 1-D int64 tensor",
          lambda: _teacher(answer_prefix_ids=torch.tensor([1.0]))),
    _case("prompt-negative-id", ValueError, r"prompt_ids\[0\]",
          lambda: _teacher(prompt_ids=[_ids(-1, 2)])),
    _case("rewards-str", TypeError, "rewards",
          lambda: _teacher(rewards="10")),
    _case("pad_token_id-float", TypeError, "pad_token_id",
          lambda: _teacher(pad_token_id=1.5)),
    _case("ignore_index-str", TypeError, "ignore_index",
          lambda: _teacher(ignore_index="-100")),
    _case("device-unknown", ValueError, "device", lambda: _teacher(device="gpu")),
    _case("split-shape", ValueError, r"logprobs must be \[R, T\]", lambda: _teacher().split(torch.randn(1, 1))),
]

def _padded(**changes):
    args = dict(prompt_ids=torch.tensor([[0, 5, 6], [4, 5, 6]]), prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
                completion_ids=torch.tensor([[7, 8], [9, 0]]), completion_mask=torch.tensor([[1, 1], [1, 0]]))
    args.update(changes)
    return rlloss.PaddedBatch.from_trl(**args)


PADDED_BATCH = [
    _case("prompt_ids-float", TypeError, "prompt_ids must be int64", lambda: _padded(prompt_ids=torch.zeros(2, 3))),
    _case("prompt_ids-1d", ValueError, "prompt_ids must be 2-D", lambda: _padded(prompt_ids=torch.zeros(3).long())),
    _case("completion_ids-list", TypeError, "completion_ids must be a torch.Tensor",
          lambda: _padded(completion_ids=[[7, 8], [9, 0]])),
    _case("batch-mismatch", ValueError, "prompt_ids and completion_ids must have the same batch size",
          lambda: _padded(completion_ids=torch.tensor([[7, 8]]), completion_mask=torch.tensor([[1, 1]]))),
    _case("prompt_mask-shape", ValueError, "prompt_mask must have prompt_ids's shape",
          lambda: _padded(prompt_mask=torch.ones(2, 2).long())),
    _case("completion_mask-float", TypeError, "completion_mask must be bool or an integer",
          lambda: _padded(completion_mask=torch.ones(2, 2))),
    _case("completion_mask-two", ValueError, "completion_mask must hold only 0 and 1",
          lambda: _padded(completion_mask=torch.tensor([[1, 2], [1, 0]]))),
    _case("prompt-right-padded", ValueError, r"prompt_mask\[:, -1\] must be all 1",
          lambda: _padded(prompt_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))),
    _case("no-completion-columns", ValueError, "completion_ids has no columns",
          lambda: _padded(completion_ids=torch.zeros(2, 0).long(), completion_mask=torch.zeros(2, 0).long())),
]


GLOBAL_COUNTS = [
    _case("mask-empty-list", ValueError, "mask must be a \\[B, T\\] tensor or a non-empty sequence",
          lambda: rlloss.global_counts([])),
    _case("mask-1d", ValueError, "mask must be 2-D", lambda: rlloss.global_counts(torch.ones(3))),
    _case("mask-item-list", TypeError, r"mask\[1\] must be a torch.Tensor",
          lambda: rlloss.global_counts([torch.ones(2, 3), [[1, 0]]])),
    _case("mask-complex", TypeError, "mask must be bool or a real 0/1 tensor",
          lambda: rlloss.global_counts(torch.ones(2, 3, dtype=torch.complex64))),
    _case("average_gradients-int", TypeError, "average_gradients must be",
          lambda: rlloss.global_counts(torch.ones(2, 3), average_gradients=1)),
]


# docs/math.md §9: the extension points and the family's helpers.
FAMILY_R = torch.tensor([0.1, 0.9, 0.5, 0.3])
FAMILY = {
    "mc_grpo_keep_mask": [
        _case("no-groups", ValueError, "exactly one of group_size, group_sizes and group_ids.*got none",
              lambda: rlloss.mc_grpo_keep_mask(FAMILY_R)),
        _case("ids-float", TypeError, "group_ids must hold integers",
              lambda: rlloss.mc_grpo_keep_mask(FAMILY_R, group_ids=torch.zeros(4))),
    ],
    "d3s_sample_mask": [
        _case("keep-0", ValueError, "keep must be >= 1", lambda: rlloss.d3s_sample_mask(FAMILY_R, 0, group_size=2)),
        _case("advantages-int", TypeError, "advantages must have dtype",
              lambda: rlloss.d3s_sample_mask(torch.arange(4), 1, group_size=2)),
    ],
    "discounted_returns": [
        _case("gamma-2", ValueError, r"gamma must lie in \[0, 1\]",
              lambda: rlloss.discounted_returns(FAMILY_R, torch.zeros(4, dtype=torch.int64), 2.0)),
        _case("ids-shape", ValueError, "trajectory_ids must have rewards' shape",
              lambda: rlloss.discounted_returns(FAMILY_R, torch.zeros(3, dtype=torch.int64), 0.9)),
    ],
    "gigpo_advantages": [
        _case("anchor-shape", ValueError, "anchor_ids must have episode_ids' shape",
              lambda: rlloss.gigpo_advantages(FAMILY_R, FAMILY_R, torch.zeros(4, dtype=torch.int64),
                                              torch.zeros(3, dtype=torch.int64))),
    ],
    "pairwise_advantages": [
        _case("weights-shape", ValueError, r"pair_weights must be \[B, B\]",
              lambda: rlloss.pairwise_advantages(FAMILY_R, torch.ones(4, 3), group_size=2)),
    ],
}
POLICY_LOSS += [
    _case("epsilon_low-shape", ValueError, r"epsilon_low must be \[B\]",
          lambda: _policy(epsilon_low=torch.full((B + 1,), 0.1))),
    _case("epsilon_high-negative", ValueError, "epsilon_high must be >= 0 everywhere",
          lambda: _policy(epsilon_high=torch.full((B,), -0.1))),
    _case("token_select-without-entropy", ValueError, "entropy is required when config.token_select",
          lambda: _policy(config=LossConfig(token_select="entropy", token_select_fraction=0.5))),
]
FUSED += [
    _case("epsilon_low-above-1", ValueError, r"epsilon_low must lie in \[0, 1\]",
          lambda: _fused(epsilon_low=torch.full((B, T), 1.5))),
]
LOSS_CONFIG += [
    _case("token_select-unknown", ValueError, "token_select must be one of",
          lambda: LossConfig(token_select="advantage")),
    _case("token_select_fraction-0", ValueError, r"token_select_fraction must lie in \(0, 1\]",
          lambda: LossConfig(token_select="entropy", token_select_fraction=0.0)),
    _case("token_select_fraction-alone", ValueError, "needs token_select",
          lambda: LossConfig(token_select_fraction=0.5)),
    _case("off_policy_mask_threshold-nan", ValueError, "off_policy_mask_threshold must be finite",
          lambda: LossConfig(off_policy_mask_threshold=math.nan)),
]

CATALOGUE = {
    "token_logprobs": TOKEN_LOGPROBS, "logprobs_from_logits": LOGITS, "group_advantages": ADVANTAGES,
    "policy_loss": POLICY_LOSS, "FusedPolicyLoss": FUSED,
    "fused_policy_loss": FUSED_FUNCTIONAL, "LossConfig": LOSS_CONFIG, "contrastive_credit": CREDIT,
    "LinearDecay": LINEAR_DECAY, "shared_prefix_attention": ATTENTION, "SharedPrefixLayout": LAYOUT_CASES,
    "SharedPrefixBatch": PREFIX_BATCH, "build_teacher_inputs": TEACHER, "PaddedBatch": PADDED_BATCH,
    "global_counts": GLOBAL_COUNTS, **FAMILY,
}


def _flatten():
    for api, cases in CATALOGUE.items():
        for case in cases:
            yield pytest.param(*case.values, id=f"{api}-{case.id}", marks=case.marks)


@pytest.mark.parametrize("call, error, match", list(_flatten()))
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_catalogue_covers_every_public_callable():
    """Every public function and class that takes arguments has cases here (a new export needs its own)."""
    exempt = {"PolicyLossOutput", "TokenLogprobs", "GlobalCounts", "credit", "teacher", "family"}  # result tuples, submodules
    public = {name for name in rlloss.__all__ if name not in exempt}
    covered = set(CATALOGUE) | {"LossConfig"}
    assert public - covered == set(), f"no bad-input cases for {sorted(public - covered)}"
    assert sum(len(cases) for cases in CATALOGUE.values()) >= 60
