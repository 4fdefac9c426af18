"""Decoder: output shapes, mask tokens at masked positions, no final LayerNorm."""

from __future__ import annotations

import torch

from xkd.model.decoder import Decoder
from xkd.model.masking import random_masking


def test_decoder_predicts_every_patch() -> None:
    dec = Decoder(32, 16, 1, 2, 4.0, False, True, num_tokens=64, patch_dim=384)
    _, _, ids_restore = random_masking(torch.zeros(3, 64, 32), 0.85)
    latent = torch.randn(3, 1 + 10, 32)
    assert dec(latent, ids_restore).shape == (3, 64, 384)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in [dec.pred, *dec.children()])


def test_masked_positions_see_only_the_mask_token() -> None:
    # With zero-depth blocks the prediction at a masked position is pred(mask_token + pos), whatever the input.
    dec = Decoder(8, 8, 0, 2, 4.0, False, True, num_tokens=6, patch_dim=4)
    torch.manual_seed(0)
    _, mask, ids_restore = random_masking(torch.zeros(2, 6, 8), 0.5)
    a, b = dec(torch.randn(2, 4, 8), ids_restore), dec(torch.randn(2, 4, 8), ids_restore)
    masked = mask.bool()
    torch.testing.assert_close(a[masked], b[masked])
    assert not torch.allclose(a[~masked], b[~masked])
