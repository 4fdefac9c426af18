"""Random masking keeps round(N (1 - r)) tokens per sample and `ids_restore` inverts the shuffle."""

from __future__ import annotations

import pytest
import torch

from xkd.model.masking import random_masking, restore_order


@pytest.mark.parametrize(
    ("n", "ratio", "kept"), [(392, 0.85, 59), (560, 0.80, 112), (64, 0.85, 10), (16, 0.8, 3)]
)
def test_keeps_exact_count_and_restores_order(n: int, ratio: float, kept: int) -> None:
    torch.manual_seed(0)
    tokens = torch.arange(n, dtype=torch.float32)[None, :, None].expand(4, n, 2).clone()  # value = position
    visible, mask, ids_restore = random_masking(tokens, ratio)
    assert visible.shape == (4, kept, 2)
    assert torch.equal(mask.sum(1), torch.full((4,), float(n - kept)))
    # The kept tokens are exactly the unmasked positions.
    for b in range(4):
        positions = visible[b, :, 0].long().sort().values
        assert torch.equal(positions, (mask[b] == 0).nonzero().squeeze(1))
    # [visible; masked] gathered with ids_restore is the original order.
    restored = restore_order(visible, torch.full((1, 1, 2), -1.0), ids_restore)
    assert torch.equal(restored[mask == 0], tokens[mask == 0])
    assert bool((restored[mask == 1] == -1).all())


def test_masks_differ_per_sample() -> None:
    torch.manual_seed(0)
    _, mask, _ = random_masking(torch.zeros(8, 64, 1), 0.75)
    assert len({tuple(m.tolist()) for m in mask}) == 8


def test_ratio_that_keeps_nothing_raises() -> None:
    with pytest.raises(ValueError, match="keeps no token"):
        random_masking(torch.zeros(1, 4, 1), 0.9)
