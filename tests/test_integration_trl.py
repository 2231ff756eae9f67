"""rlloss inside TRL 1.16's GRPOTrainer (tiny random Llama, in-memory tokenizer, no downloads, no generation).

The batch TRL's ``compute_loss`` takes (left-padded prompts, ragged completions, advantages, old and reference
log-probs, num_items_in_batch) is built by hand; the stock trainer's ``compute_loss`` and the patched one
(``patch_grpo_trainer``) / ``RllossGRPOTrainer`` must give the same loss, the same gradient of every parameter
and the same logged metrics (TRL's ``clip_ratio/low_min`` / ``high_max`` excepted: documented as not logged).
"""
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from rlloss import LossConfig  # noqa: E402
from rlloss.integrations.trl import (  # noqa: E402
    RllossGRPOTrainer, loss_config_from_grpo_config, patch_grpo_trainer)

VOCAB = 64
B, P, C = 4, 5, 6
RTOL, ATOL = 1e-5, 1e-6
NOT_LOGGED = {"clip_ratio/low_min", "clip_ratio/high_max", "vespo/phi_seq_mean"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      initializer_range=0.2, attention_dropout=0.0, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    save_tokenizer(path)
    return str(path)


def save_tokenizer(path):
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    tokenizer.save_pretrained(path)


def grpo_config(**options):
    return trl.GRPOConfig(output_dir="unused", report_to=[], use_cpu=True, bf16=False, **options)


def reward(completions, **kwargs):
    return [0.0 for _ in completions]


def save_tiny(path, model_type, **extra):
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        model_type, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, initializer_range=0.2, attention_dropout=0.0,
        pad_token_id=0, **extra)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)


def make_trainer(model_dir, tmp_path, cls=None, **options):
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=B, num_generations=2,
                          max_completion_length=C, gradient_accumulation_steps=2, steps_per_generation=4,
                          report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                          **{"bf16": False, **options})
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    dataset = datasets.Dataset.from_dict({"prompt": ["w2 w3", "w4 w5 w6", "w7", "w8 w9"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = (cls or trl.GRPOTrainer)(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                                           processing_class=tokenizer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2  # set by Trainer's training loop
    return trainer


def make_inputs(trainer, beta, seed=0, lengths=(6, 3, 1, 4)):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(2, VOCAB, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    for row, pad in enumerate((0, 2, 1, 3)):  # left padding
        prompt_mask[row, :pad] = 0
        prompt_ids[row, :pad] = 0
    completion_ids = torch.randint(2, VOCAB, (B, C), generator=g)
    completion_mask = torch.ones(B, C, dtype=torch.long)
    for row, n in enumerate(lengths):  # ragged right padding
        completion_mask[row, n:] = 0
        completion_ids[row, n:] = 0
    model = trainer.model
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), C)
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=torch.randn(B, generator=g),
                  # off-policy by up to ±0.6 nats, so that every clip branch is taken
                  old_per_token_logps=logps + 0.3 * torch.randn(B, C, generator=g),
                  num_items_in_batch=completion_mask.sum() * 2)
    if beta:
        inputs["ref_per_token_logps"] = logps + 0.2 * torch.randn(B, C, generator=g)
    return inputs


SEQUENCE_NOT_LOGGED = {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "cispo_clip_ratio"}


def run(trainer, inputs, skip=()):
    trainer._metrics = {"train": __import__("collections").defaultdict(list),
                        "eval": __import__("collections").defaultdict(list)}
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    metrics = {k: v for k, v in trainer._metrics["train"].items() if k not in NOT_LOGGED and k not in skip}
    return loss.detach(), grads, metrics


def assert_same(stock, ours):
    (l0, g0, m0), (l1, g1, m1) = stock, ours
    torch.testing.assert_close(l1, l0, rtol=RTOL, atol=ATOL)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=RTOL, atol=ATOL, msg=name)
    assert m0.keys() == m1.keys(), (sorted(m0), sorted(m1))
    for key in m0:
        assert m1[key] == pytest.approx(m0[key], rel=RTOL, abs=ATOL), key


CASES = [(lt, lvl, beta) for lt in ("grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo")
         for lvl, beta in (("token", 0.0), ("sequence", 0.05))]
CASES += [(lt, "token", 0.05) for lt in ("grpo", "dapo", "cispo", "sapo")]
CASES += [("grpo", "sequence", 0.0), ("dapo", "sequence", 0.0)]
CASES += [("luspo", "sequence", 0.05), ("luspo", "token", 0.0), ("vespo", "token", 0.05)]


@pytest.mark.parametrize("loss_type,level,beta", CASES)
def test_patched_trainer_matches_stock(model_dir, tmp_path, loss_type, level, beta):
    trainer = make_trainer(model_dir, tmp_path, loss_type=loss_type, importance_sampling_level=level, beta=beta)
    inputs = make_inputs(trainer, beta)
    skip = SEQUENCE_NOT_LOGGED if level == "sequence" else ()
    stock = run(trainer, inputs, skip)
    if loss_type not in ("sapo", "vespo") and level == "token":
        assert any(v[0] > 0 for k, v in stock[2].items() if "clip" in k)  # clipping happens in this batch
    patch_grpo_trainer(trainer)
    assert_same(stock, run(trainer, inputs))


@pytest.mark.parametrize("loss_type,options", [
    ("dapo", dict(epsilon_high=0.28, entropy_coef=0.01, temperature=0.7)),
    ("grpo", dict(delta=1.5, entropy_coef=0.02, use_bias_correction_kl=False, beta=0.05)),
    ("cispo", dict(epsilon_high=1.1)),
])
def test_subclass_matches_stock(model_dir, tmp_path, loss_type, options):
    trainer = make_trainer(model_dir, tmp_path, cls=RllossGRPOTrainer, loss_type=loss_type, **options)
    inputs = make_inputs(trainer, options.get("beta", 0.0), seed=1)
    stock_compute = trl.GRPOTrainer._compute_loss
    ours = run(trainer, inputs)
    trainer._compute_loss = stock_compute.__get__(trainer)
    assert_same(run(trainer, inputs), ours)


def test_eval_mode_matches_stock(model_dir, tmp_path):
    trainer = make_trainer(model_dir, tmp_path, loss_type="dapo")
    trainer.model.eval()
    inputs = make_inputs(trainer, 0.0)
    trainer._metrics = {"train": {}, "eval": __import__("collections").defaultdict(list)}
    with torch.no_grad():
        stock = trainer.compute_loss(trainer.model, inputs)
        patch_grpo_trainer(trainer)
        ours = trainer.compute_loss(trainer.model, inputs)
    torch.testing.assert_close(ours, stock, rtol=RTOL, atol=ATOL)


def test_config_mapping():
    args = grpo_config(loss_type="dr_grpo", max_completion_length=33, beta=0.1,
                          epsilon=0.1, epsilon_high=0.3)
    cfg = loss_config_from_grpo_config(args)
    assert cfg == LossConfig.preset("dr_grpo", max_completion_length=33, beta=0.1, epsilon_low=0.1,
                                    epsilon_high=0.3)
    assert loss_config_from_grpo_config(grpo_config()) == \
        LossConfig.preset("dapo")


@pytest.mark.parametrize("options,names", [
    (dict(loss_type="vespo", importance_sampling_level="sequence", beta=0.05),
     ["importance_sampling_level='sequence' with loss_type='vespo'"]),
    (dict(top_entropy_quantile=0.0, off_policy_mask_threshold=float("nan")),
     ["top_entropy_quantile=0.0", "off_policy_mask_threshold=nan"]),
    (dict(use_adaptive_entropy=True, use_liger_kernel=True), ["use_adaptive_entropy", "use_liger_kernel"]),
])
def test_refused_options_are_named(options, names):
    args = grpo_config(**options)
    with pytest.raises(ValueError) as info:
        loss_config_from_grpo_config(args)
    for name in names:
        assert name in str(info.value)


def test_patch_needs_a_grpo_trainer():
    with pytest.raises(TypeError, match="GRPOTrainer"):
        patch_grpo_trainer(object())


def test_bf16_autocast_close_to_stock(model_dir, tmp_path):
    # GRPOConfig's default bf16=True: TRL's head computes in the autocast dtype, and so does rlloss's; the
    # two chunked bf16 computations round differently, so the comparison is at bf16 precision.
    trainer = make_trainer(model_dir, tmp_path, loss_type="dapo", bf16=True)
    inputs = make_inputs(trainer, 0.0)
    (l0, g0, _), (l1, g1, _) = run(trainer, inputs), run(patch_grpo_trainer(trainer), inputs)
    torch.testing.assert_close(l1, l0, rtol=2e-2, atol=2e-3)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=5e-2, atol=5e-3, msg=name)


@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("dapo", "token"), ("sapo", "sequence")])
def test_tool_mask_and_empty_completion(model_dir, tmp_path, loss_type, level):
    # A row with no completion token, and a tool mask that hides tokens of the others (TRL: mask =
    # completion_mask * tool_mask for the loss, the log-probs still computed on completion_mask).
    trainer = make_trainer(model_dir, tmp_path, loss_type=loss_type, importance_sampling_level=level,
                           entropy_coef=0.01)
    inputs = make_inputs(trainer, 0.0, seed=2, lengths=(6, 0, 2, 5))
    tool_mask = torch.ones(B, C, dtype=torch.long)
    tool_mask[0, 1:3] = 0
    tool_mask[3, 0] = 0
    inputs["tool_mask"] = tool_mask
    skip = SEQUENCE_NOT_LOGGED if level == "sequence" else ()
    stock = run(trainer, inputs, skip)
    patch_grpo_trainer(trainer)
    assert_same(stock, run(trainer, inputs))


def test_cast_lm_head_to_fp32_bf16(model_dir, tmp_path):
    # bf16 autocast with the head cast to float32 (TRL's cast_lm_head_to_fp32): both heads in float32.
    trainer = make_trainer(model_dir, tmp_path, loss_type="grpo", bf16=True, cast_lm_head_to_fp32=True)
    inputs = make_inputs(trainer, 0.0, seed=3)
    stock = run(trainer, inputs)
    patch_grpo_trainer(trainer)
    assert_same(stock, run(trainer, inputs))


@pytest.mark.parametrize("model_type,extra", [
    ("gemma2", dict(final_logit_softcapping=3.0, attn_logit_softcapping=None)),  # soft-capped logits
    ("cohere", dict(logit_scale=0.5)),                                             # scaled logits
])
def test_logit_transforms_match_stock(tmp_path, model_type, extra):
    if not hasattr(transformers, {"gemma2": "Gemma2ForCausalLM", "cohere": "CohereForCausalLM"}[model_type]):
        pytest.skip(f"transformers has no {model_type}")
    path = tmp_path / model_type
    save_tiny(path, model_type, **extra)
    save_tokenizer(path)
    trainer = make_trainer(str(path), tmp_path / "out", loss_type="dapo", temperature=0.8)
    inputs = make_inputs(trainer, 0.0, seed=4)
    stock = run(trainer, inputs)
    patch_grpo_trainer(trainer)
    assert (trainer._rlloss_softcap, trainer._rlloss_logit_scale) == (
        extra.get("final_logit_softcapping"), extra.get("logit_scale", 1.0))
    assert_same(stock, run(trainer, inputs))


@pytest.mark.parametrize("loss_type,level,mode", [
    ("dapo", "token", "token_truncate"), ("grpo", "token", "token_mask"), ("cispo", "token", "sequence_mask"),
    ("vespo", "token", "token_mask"),
    ("sapo", "token", "sequence_truncate"), ("grpo", "sequence", "sequence_mask"), ("bnpo", "token", "token_mask"),
])
def test_vllm_importance_sampling_matches_stock(model_dir, tmp_path, loss_type, level, mode):
    # The weight TRL computes from the vLLM log-probs (GRPOTrainer._generate_and_score_completions) arrives as
    # inputs["importance_sampling_ratio"]; vLLM itself is not needed for the loss.
    trainer = make_trainer(model_dir, tmp_path, loss_type=loss_type, importance_sampling_level=level, beta=0.05,
                           vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=0.8,
                           vllm_importance_sampling_clip_max=1.2)
    trainer.use_vllm = True  # GRPOConfig(use_vllm=True) would need vLLM installed
    inputs = make_inputs(trainer, 0.05, seed=5)
    g = torch.Generator().manual_seed(6)
    mask = inputs["completion_mask"]
    diff = 0.15 * torch.randn(B, C, generator=g) * mask
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = diff.exp()
    if mode.endswith("truncate"):
        ratio = ratio.clamp(min=0.8, max=1.2)
    else:
        ratio = ratio.masked_fill((ratio < 0.8) | (ratio > 1.2), 0.0)
        assert (ratio == 0).any() and (ratio > 0).any()
    inputs["importance_sampling_ratio"] = ratio
    skip = SEQUENCE_NOT_LOGGED if level == "sequence" or mode.endswith("mask") else ()
    stock = run(trainer, inputs, skip)
    patch_grpo_trainer(trainer)
    assert_same(stock, run(trainer, inputs))


def test_refuses_moe_aux_loss_and_multimodal_inputs(model_dir, tmp_path):
    trainer = make_trainer(model_dir, tmp_path, loss_type="dapo")
    trainer.aux_loss_enabled = True  # what GRPOTrainer sets for an MoE model with router_aux_loss_coef ≠ 0
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        patch_grpo_trainer(trainer)
    trainer.aux_loss_enabled = False
    patch_grpo_trainer(trainer)
    inputs = make_inputs(trainer, 0.0)
    inputs["pixel_values"] = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="pixel_values"):
        trainer.compute_loss(trainer.model, inputs)


def test_config_mapping_selection_and_peer_losses():
    args = grpo_config(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_neg=2.5, top_entropy_quantile=0.3,
                       off_policy_mask_threshold=0.1, beta=0.02)
    assert loss_config_from_grpo_config(args) == LossConfig.preset(
        "vespo", vespo_k_pos=1.5, vespo_lambda_neg=2.5, token_select="entropy", token_select_fraction=0.3,
        off_policy_mask_threshold=0.1, beta=0.02)
    # VESPO forms its own sequence ratio: without a ratio-weighted KL the level changes nothing in TRL
    args = grpo_config(loss_type="vespo", importance_sampling_level="sequence")
    assert loss_config_from_grpo_config(args) == LossConfig.preset("vespo")
    args = grpo_config(loss_type="luspo", importance_sampling_level="token", delta=2.0)
    assert loss_config_from_grpo_config(args) == LossConfig.preset("luspo", importance_sampling_level="token",
                                                                   delta=2.0)


def _logps(trainer, inputs):
    with torch.no_grad():
        return trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), C, compute_entropy=True)[:2]


@pytest.mark.parametrize("loss_type,options", [
    ("dapo", dict()),
    ("grpo", dict(entropy_coef=0.01, beta=0.05)),
    ("luspo", dict(importance_sampling_level="sequence", entropy_coef=0.01)),
    ("vespo", dict(entropy_coef=0.01)),
])
def test_top_entropy_quantile_matches_stock(model_dir, tmp_path, loss_type, options):
    trainer = make_trainer(model_dir, tmp_path, loss_type=loss_type, top_entropy_quantile=0.5, **options)
    inputs = make_inputs(trainer, options.get("beta", 0.0), seed=7)
    _, entropies = _logps(trainer, inputs)
    kept = trainer.get_high_entropy_mask(entropies, inputs["completion_mask"], 0.5)
    assert 0 < kept.sum() < inputs["completion_mask"].sum()  # the quantile drops tokens in this batch
    skip = SEQUENCE_NOT_LOGGED if options.get("importance_sampling_level") == "sequence" else set()
    skip = skip | ({"policy_loss"} if options.get("entropy_coef") else set())  # documented as not logged
    stock = run(trainer, inputs, skip)
    trainer.top_entropy_quantile = 1.0
    assert not torch.allclose(run(trainer, inputs)[0], stock[0])  # the option changes the stock loss
    trainer.top_entropy_quantile = 0.5
    patch_grpo_trainer(trainer)
    assert_same(stock, run(trainer, inputs, skip))


@pytest.mark.parametrize("loss_type,options,sampling", [
    ("dapo", dict(), False),
    ("grpo", dict(beta=0.05), True),
    ("vespo", dict(), True),
    ("cispo", dict(top_entropy_quantile=0.6, entropy_coef=0.01), True),
])
def test_off_policy_mask_matches_stock(model_dir, tmp_path, loss_type, options, sampling):
    trainer = make_trainer(model_dir, tmp_path, loss_type=loss_type, off_policy_mask_threshold=0.02, **options)
    inputs = make_inputs(trainer, options.get("beta", 0.0), seed=8)
    inputs["advantages"] = torch.tensor([-1.0, -0.5, 0.7, -0.8])
    logps, _ = _logps(trainer, inputs)
    adv, mask = inputs["advantages"].unsqueeze(1), inputs["completion_mask"]
    keep = trainer.get_off_policy_mask(adv, logps, inputs["old_per_token_logps"], mask, 0.02)
    if sampling:  # vLLM's log-probs, which TRL's mask prefers to the old ones: shifted to flip every A < 0 row
        g = torch.Generator().manual_seed(9)
        shift = torch.where(keep == 1, 0.5, -0.5)
        inputs["sampling_per_token_logps"] = (inputs["old_per_token_logps"] + shift
                                              + 0.05 * torch.randn(B, C, generator=g))
        flipped = trainer.get_off_policy_mask(adv, logps, inputs["sampling_per_token_logps"], mask, 0.02)
        assert (flipped != keep).any()
        # a token vLLM could not score (NaN; TRL counts its KL as 0) in a kept row of A < 0, which a NaN mean
        # would drop
        row = int(((flipped[:, 0] == 1) & (adv[:, 0] < 0)).nonzero()[0])
        inputs["sampling_per_token_logps"][row, 0] = float("nan")
        keep = trainer.get_off_policy_mask(adv, logps, inputs["sampling_per_token_logps"], mask, 0.02)
        assert keep[row] == 1 and (keep != flipped).sum() == 0
    assert (keep == 0).any() and (keep[adv < 0] == 1).any()  # drops some A < 0 rows, not all
    skip = SEQUENCE_NOT_LOGGED if options.get("importance_sampling_level") == "sequence" else set()
    skip = skip | ({"policy_loss"} if options.get("entropy_coef") else set())
    stock = run(trainer, inputs, skip)
    trainer.off_policy_mask_threshold = None
    assert not torch.allclose(run(trainer, inputs)[0], stock[0])  # the mask changes the stock loss
    trainer.off_policy_mask_threshold = 0.02
    patch_grpo_trainer(trainer)
    assert_same(stock, run(trainer, inputs, skip))


def test_entropy_quantile_warns_with_several_processes(model_dir, tmp_path, monkeypatch):
    trainer = make_trainer(model_dir, tmp_path, loss_type="dapo", top_entropy_quantile=0.5)
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 2))
    with pytest.warns(UserWarning, match="top_entropy_quantile=0.5 with 2 processes"):
        patch_grpo_trainer(trainer)


def test_vespo_refuses_sequence_importance_weights(model_dir, tmp_path):
    # TRL refuses vespo with the sequence modes at construction; a [B, 1] weight reaching the loss is refused too.
    trainer = patch_grpo_trainer(make_trainer(model_dir, tmp_path, loss_type="vespo"))
    inputs = make_inputs(trainer, 0.0)
    inputs["importance_sampling_ratio"] = torch.ones(B, 1)
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode"):
        trainer.compute_loss(trainer.model, inputs)
