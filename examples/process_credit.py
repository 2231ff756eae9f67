"""Token-level credit from process signals through per-token advantages (docs/math.md §9), on a CPU in a second.

A completion is a sequence of reasoning segments (steps); a process verifier scores each segment. Methods
such as GRPO-VPS (segment progress) and APPO (procedure-level scaling) turn those scores into a per-token
advantage Â_t, which every rlloss path accepts as ``advantages`` of shape [B, T] — the fused one-pass loss
included. The two rules below show the mechanism with plain, labelled formulas; they are not the papers'
exact ones (see docs/math.md §9, "what the available sources do not pin down"):

- progress:   Â_t = A_i + α·(v_k − v_{k−1}) for a token t of segment k (v_0 = 0): the outcome advantage plus
              how much the segment raised the verifier's value;
- scaling:    Â_t = A_i·c_k, c_k = 1 + α·(2·v_k − 1): the outcome advantage scaled up on segments the
              verifier rates well and down on the others (the sign of the update stays the outcome's for α < 1).

Run: ``python examples/process_credit.py``.
"""
from __future__ import annotations

import argparse

import torch

import rlloss
from rlloss import FusedPolicyLoss, LossConfig, reference


def segment_ids(lengths, T):
    """[B, T] index of the segment of each token (segments laid end to end), -1 past the completion."""
    ids = torch.full((len(lengths), T), -1, dtype=torch.int64)
    for i, row in enumerate(lengths):
        ids[i, : sum(row)] = torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
    return ids


def token_advantages(outcome_adv, segments, values, rule, alpha):
    """Â [B, T] from the outcome advantage [B], the segment index [B, T] and segment values [B, K]."""
    seg = segments.clamp(min=0)
    v = values.gather(1, seg)
    if rule == "progress":
        previous = torch.cat([torch.zeros_like(values[:, :1]), values[:, :-1]], 1).gather(1, seg)
        adv = outcome_adv[:, None] + alpha * (v - previous)
    else:
        adv = outcome_adv[:, None] * (1.0 + alpha * (2.0 * v - 1.0))
    return torch.where(segments >= 0, adv, torch.zeros_like(adv))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rule", choices=("progress", "scaling"), default="progress")
    parser.add_argument("--alpha", type=float, default=0.5)
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    D, V, G = 16, 64, 4
    # one prompt, G completions of 2–3 segments each; rewards 0/1; the verifier's value after each segment
    lengths = [[3, 4, 2], [5, 2], [2, 2, 3], [4, 4]]
    T = max(sum(row) for row in lengths)
    segments = segment_ids(lengths, T)
    mask = segments >= 0
    values = torch.tensor([[0.3, 0.7, 0.9], [0.4, 0.2, 0.0], [0.5, 0.6, 0.95], [0.2, 0.1, 0.0]])
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    outcome = rlloss.group_advantages(rewards, group_size=G)
    adv = token_advantages(outcome, segments, values, args.rule, args.alpha)

    hidden = torch.randn(G, T, D, generator=g, requires_grad=True)
    weight = 0.3 * torch.randn(V, D, generator=g)
    weight.requires_grad_(True)
    targets = torch.randint(0, V, (G, T), generator=g)
    config = LossConfig.preset("dapo")
    out = FusedPolicyLoss(config)(hidden, weight, targets, mask, adv)
    out.loss.backward()

    # the same loss by the float64 reference composition
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logp, _ = reference.token_logprobs(h, w, torch.where(mask, targets, -100))
    expected, _ = reference.policy_loss(logp, None, adv.double(), mask, config=config)
    expected.backward()
    assert torch.allclose(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(hidden.grad.double(), h.grad, rtol=1e-4, atol=1e-6)
    print(f"rule={args.rule}: loss {out.loss.item():.5f} (reference {expected.item():.5f})")
    for i in range(G):
        print(f"  completion {i}: A = {outcome[i].item():+.3f}, Â per token = "
              + " ".join(f"{a:+.2f}" for a in adv[i, mask[i]].tolist()))
    return out.loss.item()


if __name__ == "__main__":
    main()
