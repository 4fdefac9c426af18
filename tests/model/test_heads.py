"""Projector head structure and the teacher's cross-modal refinement."""

from __future__ import annotations

import copy

import torch

from xkd.model.heads import ProjectorHead, mean_patch_tokens, refined_pool, refinement_weights


def test_head_structure_and_output_norm() -> None:
    head = ProjectorHead(32, 64, 3, 16, 128)
    out = head(torch.randn(5, 32))
    assert out.shape == (5, 128)
    # Non-affine LayerNorm output: zero mean, unit variance per row.
    torch.testing.assert_close(out.mean(-1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)
    assert [tuple(layer.weight.shape) for layer in head.hidden] == [(64, 32), (64, 64)]
    assert head.bottleneck.weight.shape == (16, 64)
    # One hidden LayerNorm module, shared by both hidden layers; no affine output LN.
    assert sum(isinstance(m, torch.nn.LayerNorm) and m.elementwise_affine for m in head.modules()) == 1
    assert not head.out_norm.elementwise_affine
    assert set(head.state_dict()) == {
        "hidden.0.weight", "hidden.0.bias", "hidden.1.weight", "hidden.1.bias", "norm.weight", "norm.bias",
        "bottleneck.weight", "bottleneck.bias", "last.weight",
    }  # fmt: skip


def test_last_layer_is_weight_normalised_with_unit_gain() -> None:
    head = ProjectorHead(8, 16, 3, 4, 10)
    x = torch.randn(3, 8)
    before = head(x)
    scaled = copy.deepcopy(head)
    with torch.no_grad():
        scaled.last.weight.mul_(torch.rand(10, 1) * 5 + 0.1)  # row magnitudes do not matter: g is fixed to 1
    torch.testing.assert_close(scaled(x), before)
    # Gradients on the direction are orthogonal to each row (as with weight_norm's v).
    head(x).pow(2).sum().backward()
    w, g = head.last.weight, head.last.weight.grad
    torch.testing.assert_close((w * g).sum(1), torch.zeros(10), atol=1e-6, rtol=0)


def test_refinement_mean_mode_matches_the_outer_product_formula() -> None:
    torch.manual_seed(0)
    a_v = torch.softmax(torch.randn(2, 3, 7), -1) * 0.9  # CLS-to-patch rows sum < 1 (CLS column dropped)
    a_a = torch.softmax(torch.randn(2, 3, 5), -1) * 0.8
    w_v, w_a = refinement_weights(a_v, a_a, "mean")
    outer = a_a[:, :, :, None] * a_v[:, :, None, :]  # P[b, h, i, j] = a_a[i] a_v[j]
    r_v = outer.mean(2) / a_v.mean(-1, keepdim=True)
    r_a = outer.mean(3) / a_a.mean(-1, keepdim=True)
    torch.testing.assert_close(w_v, r_v.mean(1))
    torch.testing.assert_close(w_a, r_a.mean(1))
    s_v, s_a = refinement_weights(a_v, a_a, "softmax")
    assert s_v.shape == (2, 7) and s_a.shape == (2, 5)
    torch.testing.assert_close(s_v.sum(-1), torch.ones(2))


def test_refined_pool_preserves_the_pooled_norm() -> None:
    torch.manual_seed(0)
    tokens = torch.randn(4, 1 + 9, 16)
    weights = torch.rand(4, 9)
    pooled = refined_pool(tokens, weights)
    plain = mean_patch_tokens(tokens)
    torch.testing.assert_close(pooled.norm(dim=-1), plain.norm(dim=-1))
    assert not torch.allclose(pooled, plain)
    # Direction is that of the weighted mean; uniform weights give the plain mean back.
    weighted = (weights[:, :, None] * tokens[:, 1:]).mean(1)
    torch.testing.assert_close(torch.nn.functional.cosine_similarity(pooled, weighted), torch.ones(4))
    torch.testing.assert_close(refined_pool(tokens, torch.full((4, 9), 0.3)), plain)
