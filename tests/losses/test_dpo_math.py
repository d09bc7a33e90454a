"""DPO's loss by hand (sigmoid, cDPO label smoothing, IPO, the NLL term) and against TRL's DPOTrainer on the same log-probs."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from pipeline.errors import UserError
from pipeline.losses.dpo import chosen_nll, dpo_loss

# Two pairs. Pair 0: the policy raised chosen by 1 and lowered rejected by 1 against the reference (h = 2);
# pair 1 the other way round (h = -2).
POLICY_CHOSEN = torch.tensor([-1.0, -4.0])
POLICY_REJECTED = torch.tensor([-3.0, -2.0])
REF_CHOSEN = torch.tensor([-2.0, -3.0])
REF_REJECTED = torch.tensor([-2.0, -3.0])
BETA = 0.5  # beta * h = +1 and -1


def test_sigmoid_loss_and_rewards_by_hand():
    loss, chosen, rejected = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, BETA)
    # -log sigmoid(1) = log(1 + e^-1) = 0.3132617; -log sigmoid(-1) = log(1 + e) = 1.3132617
    torch.testing.assert_close(loss, torch.tensor([0.3132617, 1.3132617]))
    torch.testing.assert_close(chosen, torch.tensor([0.5, -0.5]))  # 0.5 * (-1 - -2), 0.5 * (-4 - -3)
    torch.testing.assert_close(rejected, torch.tensor([-0.5, 0.5]))
    assert not chosen.requires_grad


def test_label_smoothing_is_conservative_dpo_by_hand():
    loss, _, _ = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, BETA, label_smoothing=0.1)
    # 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.4132617; 0.9 * 1.3132617 + 0.1 * 0.3132617 = 1.2132617
    torch.testing.assert_close(loss, torch.tensor([0.4132617, 1.2132617]))


def test_ipo_averages_log_ratios_per_token_by_hand():
    loss, chosen, _ = dpo_loss(
        POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, BETA, loss_type="ipo",
        chosen_tokens=torch.tensor([2, 2]), rejected_tokens=torch.tensor([4, 4]),
    )
    # 1 / (2 beta) = 1. Pair 0: h = 1/2 - (-1)/4 = 0.75 -> (0.75 - 1)^2; pair 1: h = -1/2 - 1/4 = -0.75 -> (-1.75)^2
    torch.testing.assert_close(loss, torch.tensor([0.0625, 3.0625]))
    torch.testing.assert_close(chosen, torch.tensor([0.5, -0.5]))  # rewards stay on the summed log-ratios
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, BETA, loss_type="ipo")


def test_chosen_nll_is_per_token_over_the_batch():
    # (1 + 4) nats over 2 + 3 tokens
    torch.testing.assert_close(chosen_nll(torch.tensor([-1.0, -4.0]), torch.tensor([2, 3])), torch.tensor(1.0))


def test_an_unknown_loss_type_names_the_key():
    with pytest.raises(UserError, match=r"dpo\.loss_type=hinge.*sigmoid, ipo"):
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, BETA, loss_type="hinge")


# -- against TRL ------------------------------------------------------------------------------


def trl_loss(loss_type: str, beta: float, per_token: torch.Tensor, completion: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor):
    """TRL's DPOTrainer._compute_loss on given per-token log-probs (precomputed reference), and the metrics it logs.

    The method runs unbound on a stub trainer holding the attributes it reads; the "model" returns the
    given log-probs (TRL's fused LM head returns them per next token, 0 outside the completion).
    `per_token` (2B, T-1) and `completion` (2B, T) hold the chosen rows first, then the rejected, as TRL's batches do.
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    n, width = completion.shape
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros(n, width - 1),
        mean_logits=torch.zeros(n, width - 1),
        is_top1=torch.zeros(n, width - 1, dtype=torch.bool),
    )
    model = SimpleNamespace(training=True)
    fake = lambda **kwargs: outputs  # noqa: E731
    identity = lambda x: x  # noqa: E731
    stub = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device="cpu", gather=identity, gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(n, width, dtype=torch.long), "attention_mask": torch.ones(n, width, dtype=torch.long),
        "completion_mask": completion, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected,
    }
    loss = DPOTrainer._compute_loss(stub, fake, inputs, False)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_the_loss_and_its_metrics_equal_trl_on_the_same_log_probs(loss_type):
    g = torch.Generator().manual_seed(0)
    pairs, width = 4, 12
    prompt_lens = torch.tensor([3, 5, 2, 4, 3, 5, 2, 4])  # chosen rows, then the rejected of the same prompts
    answer_lens = torch.tensor([4, 2, 7, 5, 6, 3, 1, 6])
    completion = torch.zeros(2 * pairs, width, dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompt_lens, answer_lens)):
        completion[i, p : p + a] = 1
    scored = completion[:, 1:].bool()  # the next-token log-probs that predict completion tokens
    policy_tokens = torch.where(scored, -torch.rand(2 * pairs, width - 1, generator=g) * 3, 0.0)
    sums = policy_tokens.sum(1)
    ref = sums + torch.randn(2 * pairs, generator=g)
    beta = 0.2
    want, metrics = trl_loss(loss_type, beta, policy_tokens, completion, ref[:pairs], ref[pairs:])

    loss, chosen, rejected = dpo_loss(
        sums[:pairs], sums[pairs:], ref[:pairs], ref[pairs:], beta, loss_type=loss_type,
        chosen_tokens=answer_lens[:pairs], rejected_tokens=answer_lens[pairs:],
    )
    torch.testing.assert_close(loss.mean(), want, rtol=1e-6, atol=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(chosen.mean().item(), abs=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx(rejected.mean().item(), abs=1e-6)
    assert metrics["rewards/margins"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-6)
    assert metrics["rewards/accuracies"] == pytest.approx((chosen > rejected).float().mean().item())
    assert metrics["logps/chosen"] == pytest.approx(sums[:pairs].mean().item(), abs=1e-5)
