"""Losses against hand computations: reconstruction, DINO KD with centering, MMD, precision under autocast."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from xkd.model.losses import (
    kd_diagnostics,
    kd_loss,
    mmd,
    output_spread,
    reconstruction_loss,
    teacher_probs,
    update_center,
)

GAMMAS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def normalised(target: torch.Tensor) -> torch.Tensor:
    return (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()


def test_reconstruction_zero_for_perfect_prediction() -> None:
    target = torch.randn(2, 10, 12)
    mask = (torch.rand(2, 10) < 0.7).float()
    mask[:, 0] = 1
    assert reconstruction_loss(normalised(target), target, mask).item() == pytest.approx(0.0, abs=1e-10)
    assert reconstruction_loss(target, target, mask, norm_pix=False).item() == 0.0


def test_reconstruction_uses_masked_tokens_only() -> None:
    target, pred = torch.randn(2, 10, 12), torch.randn(2, 10, 12)
    mask = torch.zeros(2, 10)
    mask[0, :3] = 1
    mask[1, 5] = 1
    base = reconstruction_loss(pred, target, mask)
    # Changing visible-token predictions changes nothing.
    changed = pred.clone()
    changed[mask == 0] += 100.0
    assert reconstruction_loss(changed, target, mask).item() == pytest.approx(base.item())
    # Mean over the masked tokens of the per-token MSE against the per-patch normalised target.
    per_token = ((pred - normalised(target)) ** 2).mean(-1)
    expected = (per_token[0, :3].sum() + per_token[1, 5]) / 4
    assert base.item() == pytest.approx(expected.item(), rel=1e-6)


def test_kd_equals_hand_computed_dino_cross_entropy() -> None:
    b, k, views, tau_s, tau_t = 3, 5, 2, 0.1, 0.07
    torch.manual_seed(0)
    student, teacher, center = torch.randn(views * b, k), torch.randn(b, k), torch.randn(1, k)
    q = teacher_probs(teacher, center, tau_t)
    loss = kd_loss(student, q, tau_s)
    total = 0.0
    for v, i in itertools.product(range(views), range(b)):
        t = [math.exp((teacher[i, j] - center[0, j]).item() / tau_t) for j in range(k)]
        s = [math.exp(student[v * b + i, j].item() / tau_s) for j in range(k)]
        total += -sum(t[j] / sum(t) * math.log(s[j] / sum(s)) for j in range(k))
    assert loss.item() == pytest.approx(total / (views * b), rel=1e-5)


def test_kd_rejects_mismatched_views() -> None:
    with pytest.raises(ValueError, match="multiple of batch"):
        kd_loss(torch.randn(5, 4), torch.softmax(torch.randn(2, 4), -1), 0.1)


def test_center_update_is_an_ema_of_the_batch_mean() -> None:
    center = torch.full((1, 4), 2.0)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [2.0, 3.0, 4.0, 5.0]])
    update_center(center, logits, 0.9)
    torch.testing.assert_close(center, 0.9 * 2.0 + 0.1 * torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    update_center(center, logits, 1.0)
    torch.testing.assert_close(center, 0.9 * 2.0 + 0.1 * torch.tensor([[1.0, 2.0, 3.0, 4.0]]))


def test_output_spread_is_the_rms_std_across_clips() -> None:
    logits = torch.tensor([[0.0, 1.0], [2.0, 5.0]])  # per-output stds 1 and 2
    torch.testing.assert_close(output_spread(logits), torch.tensor(2.5).sqrt())
    assert output_spread(torch.ones(3, 4)) == 0


def mmd_reference(x: torch.Tensor, y: torch.Tensor, gammas: tuple[float, ...]) -> float:
    """Direct O(n^2) biased multi-kernel MMD in float64 from explicit differences."""
    x, y = x.double(), y.double()

    def k(a: torch.Tensor, b: torch.Tensor) -> float:
        d2 = ((a - b) ** 2).sum().item()
        return sum(math.exp(-g * d2) for g in gammas)

    def mean_k(a: torch.Tensor, b: torch.Tensor) -> float:
        return sum(k(u, v) for u in a for v in b) / (len(a) * len(b))

    return mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y)


def test_mmd_zero_for_identical_sets_and_positive_otherwise() -> None:
    torch.manual_seed(0)
    # LayerNorm-like rows (squared norm = K): the regime where the ||x||^2 + ||y||^2 - 2xy expansion fails.
    x = F.layer_norm(torch.randn(6, 8192), (8192,))
    assert mmd(x, x, GAMMAS).item() == pytest.approx(0.0, abs=1e-6)
    assert mmd(x, x[torch.randperm(6)], GAMMAS).item() == pytest.approx(0.0, abs=1e-6)
    y = F.layer_norm(x + 0.3 * torch.randn(6, 8192), (8192,))
    assert mmd(x, y, GAMMAS).item() > 1e-3
    assert mmd(torch.randn(4, 3), torch.randn(7, 3) + 1.0, GAMMAS).item() > 0


def test_mmd_matches_direct_reference() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(5, 6) * 0.5, torch.randn(3, 6) * 0.5 + 0.2  # distances spread over the bandwidths
    assert mmd(x, y, GAMMAS).item() == pytest.approx(mmd_reference(x, y, GAMMAS), rel=1e-5, abs=1e-7)
    base = F.layer_norm(torch.randn(1, 256), (256,))
    x = F.layer_norm(base + 0.5 * torch.randn(4, 256), (256,))
    y = F.layer_norm(base + 0.5 * torch.randn(5, 256), (256,))
    assert mmd(x, y, GAMMAS).item() == pytest.approx(mmd_reference(x, y, GAMMAS), rel=1e-4)


def test_mmd_has_gradients() -> None:
    x = torch.randn(4, 8, requires_grad=True)
    mmd(x, torch.randn(3, 8), GAMMAS).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_kd_and_mmd_under_bf16_autocast_match_float64() -> None:
    # 8192-d LayerNorm'd head outputs with correlated pairs (cosine ~0.9), as in training.
    torch.manual_seed(0)
    base = torch.randn(8, 8192)
    x = F.layer_norm(base + 0.45 * torch.randn(8, 8192), (8192,))
    y = F.layer_norm(base + 0.45 * torch.randn(8, 8192), (8192,))
    teacher, center = F.layer_norm(base + 0.3 * torch.randn(8, 8192), (8192,)), 0.1 * torch.randn(1, 8192)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_mmd = mmd(x, y, GAMMAS)
        q = teacher_probs(teacher, center, 0.07)
        got_kd = kd_loss(torch.cat([x, y]), q, 0.1)
    assert got_mmd.dtype == got_kd.dtype == torch.float32
    ref_mmd = mmd_reference(x, y, GAMMAS)
    q64 = torch.softmax((teacher.double() - center.double()) / 0.07, -1)
    log_p = torch.log_softmax(torch.cat([x, y]).double() / 0.1, -1).reshape(2, 8, -1)
    ref_kd = -(q64 * log_p).sum(-1).mean().item()
    assert abs(got_mmd.item() - ref_mmd) <= 1e-3 * abs(ref_mmd)
    assert abs(got_kd.item() - ref_kd) <= 1e-3 * abs(ref_kd)


def test_kd_diagnostics() -> None:
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    student = torch.tensor([[5.0, 0, 0, 0], [5.0, 0, 0, 0], [0, 0, 0, 5.0]])  # one view
    d = kd_diagnostics(student, q, torch.zeros(3, 4), "a2v")
    assert d["diag/teacher_entropy_a2v"].item() == pytest.approx(math.log(4) / 3)
    q_mean = torch.tensor([1.25, 1.25, 0.25, 0.25]) / 3
    assert d["diag/teacher_batch_entropy_a2v"].item() == pytest.approx(-(q_mean * q_mean.log()).sum().item())
    assert d["diag/prototypes_used_a2v"].item() == 2  # argmax of the uniform row is prototype 0
    assert d["diag/agreement_a2v"].item() == pytest.approx(1 / 3)
    assert d["diag/teacher_std_a2v"].item() == 0.0
