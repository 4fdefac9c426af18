"""The XKD losses: masked reconstruction, cross-modal KD with DINO centering, multi-kernel MMD domain alignment
(method sheet 2.2, 2.5, 2.6), and the detached KD diagnostics the demo findings ask for.

KD, centering and MMD run in float32 with autocast disabled (decision 6): the 8192-d head outputs have squared
norms near 8192, so reduced-precision distances and logits there are noise. The all-reduces of the DINO center and
of the output spread below are the only collectives `model/` performs, and only when torch.distributed is
initialised.

MMD distances: the release expands ||x - y||^2 = ||x||^2 + ||y||^2 - 2 x.y. With squared norms near 8192 that
expansion carries float32 cancellation errors of 1e-3 to 4e-3 (measured on LayerNorm'd 8192-d rows), which the
gamma = 1000 kernel turns into O(1) errors: a vector against itself gets k_1000 as low as 0.05 instead of 1, and for
correlated rows the float32 expansion gave MMD 1.54 where float64 gives 1.73. The distances here are computed from
the differences directly (`torch.cdist` without the matmul shortcut), equal to the expansion in exact arithmetic.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def _fp32(*tensors: Tensor) -> list[Tensor]:
    return [t.float() for t in tensors]


def autocast_off(x: Tensor) -> contextlib.AbstractContextManager:
    """Disable autocast on `x`'s device (a no-op on the meta device, which has no autocast; shape checks of the
    full-size model run there)."""
    if x.device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)


def reconstruction_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = True) -> Tensor:
    """MSE between predicted and target patches, averaged over the masked tokens only.

    Args:
        pred: (B, N, P) predicted patches.
        target: (B, N, P) raw patches (`patchify` of the input).
        mask: (B, N), 1 at masked tokens.
        norm_pix: normalise each target patch by its mean and sqrt(unbiased variance + 1e-6).

    Returns:
        Scalar: per-token MSE (mean over P) summed over masked tokens divided by their count.
    """
    pred, target = _fp32(pred, target)
    if norm_pix:
        # Centre, then the variance from the centred patches' norm: the same two-pass value as `Tensor.var`,
        # ~7x faster on the CPU (its Welford kernel costs more than the rest of the video loss), in place on a
        # single copy of the target (large fresh allocations are what the rest of the loss spends its time on).
        target = target - target.mean(dim=-1, keepdim=True)
        var = torch.linalg.vector_norm(target, dim=-1, keepdim=True).square_() / (target.shape[-1] - 1)
        target.div_(var.add_(1e-6).sqrt_())
    per_token = F.mse_loss(pred, target, reduction="none").mean(dim=-1)  # (B, N)
    return (per_token * mask).sum() / mask.sum()


def teacher_probs(teacher_logits: Tensor, center: Tensor, temp: float | Tensor) -> Tensor:
    """Centered and sharpened teacher targets q = softmax((t - c) / temp): (B, K) -> (B, K) float32."""
    with autocast_off(teacher_logits):
        return ((teacher_logits.float() - center.float()) / temp).softmax(dim=-1)


@torch.no_grad()
def update_center(center: Tensor, teacher_logits: Tensor, momentum: float) -> None:
    """In place: center <- momentum * center + (1 - momentum) * batch mean of the teacher logits, the batch mean
    taken over all processes (DINO ordering: call this after the targets of the step were computed)."""
    with autocast_off(teacher_logits):
        batch_sum = teacher_logits.float().sum(dim=0, keepdim=True)  # (1, K)
        count = teacher_logits.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            count *= dist.get_world_size()
        center.mul_(momentum).add_(batch_sum / count, alpha=1.0 - momentum)


@torch.no_grad()
def output_spread(teacher_logits: Tensor) -> Tensor:
    """Spread of a head's outputs across clips: the RMS over the K outputs of their std across the batch, averaged
    over the processes' batches. (B, K) -> () float32."""
    with autocast_off(teacher_logits):
        spread = teacher_logits.float().var(dim=0, unbiased=False).mean().sqrt()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(spread)
            spread = spread / dist.get_world_size()
        return spread


def kd_loss(student_logits: Tensor, targets: Tensor, student_temp: float) -> Tensor:
    """Cross-modal DINO cross-entropy, averaged over the student views (no view skipping: one teacher view).

    Args:
        student_logits: (V * B, K) student head outputs, V views stacked along the batch (global first).
        targets: (B, K) teacher probabilities (detached).
        student_temp: student softmax temperature.

    Returns:
        Scalar: mean over views v and samples b of -sum_k q[b, k] log softmax(s_v[b] / tau_s)[k].
    """
    b = targets.shape[0]
    if student_logits.shape[0] % b:
        raise ValueError(f"kd_loss: {student_logits.shape[0]} student rows are not a multiple of batch {b}")
    with autocast_off(student_logits):
        log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
        log_p = log_p.reshape(-1, b, log_p.shape[-1])  # (V, B, K)
        return -(targets.detach().float() * log_p).sum(dim=-1).mean()


def mmd(x: Tensor, y: Tensor, gammas: tuple[float, ...]) -> Tensor:
    """Biased (V-statistic) multi-kernel Gaussian MMD^2 between the rows of x (n, K) and y (m, K).

    MMD = mean k(x, x') + mean k(y, y') - 2 mean k(x, y), k(a, b) = sum_gamma exp(-gamma ||a - b||^2), diagonals
    included; n and m may differ.
    """

    def kernel_mean(a: Tensor, b: Tensor) -> Tensor:
        d2 = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").pow(2)  # (n, m) exact distances
        return sum(torch.exp(-g * d2) for g in gammas).mean()

    with autocast_off(x):
        x, y = _fp32(x, y)
        return kernel_mean(x, x) + kernel_mean(y, y) - 2 * kernel_mean(x, y)


@torch.no_grad()
def kd_diagnostics(
    student_logits: Tensor, targets: Tensor, teacher_logits: Tensor, direction: str
) -> dict[str, Tensor]:
    """Detached health signals of one KD direction (demo findings: collapse and uniform targets go unseen
    otherwise). Keys are prefixed `diag/` and suffixed with `direction` ("a2v" or "v2a").

    Direction "a2v" pairs the audio teacher with the video student, "v2a" the video teacher with the audio student.
    - `teacher_entropy`: mean per-sample entropy H(q) of the targets (log K means uniform, i.e. no signal).
    - `teacher_batch_entropy`: entropy of the batch-mean target (low means every sample points to few prototypes).
    - `prototypes_used`: distinct argmax prototypes of the targets in the batch.
    - `agreement`: fraction of student rows (all views) whose argmax equals their target's argmax.
    - `student_std`, `teacher_std`: std across samples of the head outputs, averaged over K (near 0 = collapse).
    """
    with autocast_off(targets):
        q = targets.float()
        b = q.shape[0]
        entropy = -(q * q.clamp_min(1e-30).log()).sum(dim=-1).mean()
        q_mean = q.mean(dim=0)
        batch_entropy = -(q_mean * q_mean.clamp_min(1e-30).log()).sum()
        target_ids = q.argmax(dim=-1)  # (B,)
        # A scatter instead of unique(): counting needs no host sync.
        used = torch.zeros(q.shape[-1], device=q.device).scatter_(0, target_ids, 1.0)
        student_ids = student_logits.float().reshape(-1, b, q.shape[-1]).argmax(dim=-1)  # (V, B)
        return {
            f"diag/teacher_entropy_{direction}": entropy,
            f"diag/teacher_batch_entropy_{direction}": batch_entropy,
            f"diag/prototypes_used_{direction}": used.sum(),
            f"diag/agreement_{direction}": (student_ids == target_ids).float().mean(),
            f"diag/student_std_{direction}": student_logits.float().std(dim=0).mean(),
            f"diag/teacher_std_{direction}": teacher_logits.float().std(dim=0).mean(),
        }
