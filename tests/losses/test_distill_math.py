"""The distillation divergences by hand (forward KL, reverse KL, JSD_beta, temperature, the mask), at zero for a perfect copy, and against TRL's GKD."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.losses.distill import distill_loss, sequence_kl, token_divergence


def logits(*probs) -> torch.Tensor:
    """Logits (1, T, V) whose softmax at position t is probs[t] (log-probabilities are such logits)."""
    return torch.log(torch.tensor([list(probs)], dtype=torch.float64)).float()


# Two tokens: the teacher T = (1/2, 1/2), the student S = (1/4, 3/4).
TEACHER, STUDENT = logits((0.5, 0.5)), logits((0.25, 0.75))


def test_two_token_divergences_by_hand():
    # forward KL(T || S) = 1/2 ln(0.5 / 0.25) + 1/2 ln(0.5 / 0.75) = 1/2 ln(4/3) = 0.1438410
    torch.testing.assert_close(token_divergence(STUDENT, TEACHER, beta=0.0), torch.tensor([[0.1438410]]))
    # reverse KL(S || T) = 1/4 ln(0.25 / 0.5) + 3/4 ln(0.75 / 0.5) = 3/4 ln(3/2) - 1/4 ln 2 = 0.1308120
    torch.testing.assert_close(token_divergence(STUDENT, TEACHER, beta=1.0), torch.tensor([[0.1308120]]))
    # beta 1/2: M = (3/8, 5/8); KL(T || M) = 1/2 ln(4/3) + 1/2 ln(4/5) = 0.0322692, KL(S || M) = 1/4 ln(2/3) + 3/4 ln(6/5) = 0.0353750;
    # JSD = 1/2 0.0322692 + 1/2 0.0353750 = 0.0338221
    torch.testing.assert_close(token_divergence(STUDENT, TEACHER, beta=0.5), torch.tensor([[0.0338221]]))
    # beta 0.9: M = 0.9 T + 0.1 S = (0.475, 0.525); JSD = 0.9 [1/2 ln(0.5/0.475) + 1/2 ln(0.5/0.525)]
    #   + 0.1 [1/4 ln(0.25/0.475) + 3/4 ln(0.75/0.525)] = 0.9 (0.0012520) + 0.1 (0.1056376) = 0.0118307
    torch.testing.assert_close(token_divergence(STUDENT, TEACHER, beta=0.9), torch.tensor([[0.0118307]]))


def test_three_token_divergences_by_hand():
    teacher, student = logits((0.7, 0.2, 0.1)), logits((0.5, 0.3, 0.2))
    # forward: 0.7 ln(0.7/0.5) + 0.2 ln(0.2/0.3) + 0.1 ln(0.1/0.2) = 0.2355306 - 0.0810930 - 0.0693147 = 0.0851228
    torch.testing.assert_close(token_divergence(student, teacher, 0.0), torch.tensor([[0.0851228]]))
    # reverse: 0.5 ln(0.5/0.7) + 0.3 ln(0.3/0.2) + 0.2 ln(0.2/0.1) = -0.1682361 + 0.1216395 + 0.1386294 = 0.0920329
    torch.testing.assert_close(token_divergence(student, teacher, 1.0), torch.tensor([[0.0920329]]))
    # beta 1/2: M = (0.6, 0.25, 0.15); 1/2 [0.7 ln(7/6) + 0.2 ln(0.8) + 0.1 ln(2/3)] + 1/2 [0.5 ln(5/6) + 0.3 ln(1.2) + 0.2 ln(4/3)]
    #   = 1/2 (0.0225085) + 1/2 (0.0212938) = 0.0219012
    torch.testing.assert_close(token_divergence(student, teacher, 0.5), torch.tensor([[0.0219012]]))


def test_temperature_divides_both_logits():
    teacher = torch.tensor([[[0.0, 0.0]]])  # uniform at any temperature
    student = torch.tensor([[[0.0, math.log(3.0)]]])  # (1/4, 3/4) at temperature 1
    torch.testing.assert_close(token_divergence(student, teacher, 0.0, temperature=1.0), torch.tensor([[0.1438410]]))  # as above
    # At temperature 2 the student's logits are (0, ln sqrt 3): S = (1, sqrt 3) / (1 + sqrt 3) = (0.3660254, 0.6339746);
    # forward KL = 1/2 ln(0.5 / 0.3660254) + 1/2 ln(0.5 / 0.6339746) = 1/2 ln((1 + sqrt 3)^2 / (4 sqrt 3)) = 0.0372523
    torch.testing.assert_close(token_divergence(student, teacher, 0.0, temperature=2.0), torch.tensor([[0.0372523]]))
    # reverse KL at 2: 0.3660254 ln(0.7320508) + 0.6339746 ln(1.2679492) = 0.0363408 (no temperature^2 factor)
    torch.testing.assert_close(token_divergence(student, teacher, 1.0, temperature=2.0), torch.tensor([[0.0363408]]))
    # The teacher's logits are divided too: at temperature 2, teacher logits (0, 2 ln 3) are T = (1/4, 3/4), and against
    # a uniform student KL(T || S) = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.1308120
    torch.testing.assert_close(token_divergence(teacher, torch.tensor([[[0.0, 2 * math.log(3.0)]]]), 0.0, temperature=2.0), torch.tensor([[0.1308120]]))


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_a_student_that_copies_the_teacher_has_loss_0_and_no_gradient(beta, temperature):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(3, 5, 11, generator=g) * 3
    student = teacher.clone().requires_grad_(True)
    loss = distill_loss(student, teacher, torch.ones(3, 5), beta, temperature)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert student.grad.abs().max().item() < 1e-6  # the copy is the minimum
    other = distill_loss(teacher + torch.randn(3, 5, 11, generator=g), teacher, torch.ones(3, 5), beta, temperature)
    assert other.item() > 1e-3  # and anything else costs something


def test_masked_tokens_carry_nothing_and_the_mean_is_over_answer_tokens():
    # Sequence 0: position 0 is the pair above (forward KL 0.1438410), position 1 is masked and wildly off.
    # Sequence 1: S = T at position 0 (KL 0), position 1 masked.
    teacher = torch.cat([torch.cat([TEACHER, logits((0.01, 0.99))], 1), torch.cat([TEACHER, TEACHER], 1)])  # (2, 2, 2)
    student = torch.cat([torch.cat([STUDENT, logits((0.99, 0.01))], 1), torch.cat([TEACHER, STUDENT], 1)])
    mask = torch.tensor([[1, 0], [1, 0]])
    # (0.1438410 + 0) / 2 answer tokens
    torch.testing.assert_close(distill_loss(student, teacher, mask, 0.0), torch.tensor(0.0719205))
    garbage = student.clone()
    garbage[:, 1] = torch.tensor([50.0, -50.0])  # the masked positions change: the loss does not
    torch.testing.assert_close(distill_loss(garbage, teacher, mask, 0.0), torch.tensor(0.0719205))
    assert distill_loss(student, teacher, torch.zeros(2, 2), 0.5).item() == 0.0  # no answer token at all: 0, not NaN


def test_sequence_kl_sums_the_exact_token_kls_of_each_sequence():
    p = torch.cat([torch.cat([STUDENT, STUDENT, STUDENT], 1), torch.cat([STUDENT, TEACHER, STUDENT], 1)])
    q = torch.cat([TEACHER, TEACHER, TEACHER], 1).expand(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # row 0: two tokens of KL(S || T) = 0.1308120; row 1: KL(S || T) + 0 + KL(S || T)
    torch.testing.assert_close(sequence_kl(p, q, mask), torch.tensor([2 * 0.1308120, 2 * 0.1308120]))
    # the other direction is the forward KL
    torch.testing.assert_close(sequence_kl(q, p, mask)[0], torch.tensor(2 * 0.1438410))


def test_bad_beta_and_temperature_are_refused():
    with pytest.raises(ValueError, match="beta=1.5"):
        token_divergence(STUDENT, TEACHER, 1.5)
    with pytest.raises(ValueError, match="temperature=0"):
        token_divergence(STUDENT, TEACHER, 0.5, temperature=0)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_equal_to_trl_gkd_generalized_jsd_loss(beta):
    """TRL's GKDTrainer.generalized_jsd_loss (labels -100 outside the answers) on the same logits: the reference semantics."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDTrainer

    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 6, 13, generator=g) * 2, torch.randn(3, 6, 13, generator=g) * 2
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0]])
    labels = torch.where(mask.bool(), 1, -100)
    for temperature in (1.0, 1.7):
        want = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
        torch.testing.assert_close(distill_loss(student, teacher, mask, beta, temperature), want, rtol=1e-5, atol=1e-6)
