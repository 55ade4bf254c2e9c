"""The folded pooling (grouped 3×3 convolutions) equals the literal unfold → resize → pool → stack → pool."""

from __future__ import annotations

import pytest
import torch

from expert.backbone import PatchEmbedder, folded_pooling, pool_to


def test_wide_resnet_layout_folds_into_two_grouped_convolutions(patch_embedder):
    folded = folded_pooling((512, 1024), 1024)
    assert [(tuple(w.shape), g) for w, g in folded] == [((512, 1, 3, 3), 512), ((512, 2, 3, 3), 512)]
    layer2_kernel = folded[0][0][0, 0]
    # Output c < 512 averages the two 5-tap windows of layer2 channel c: the centre tap is in both.
    expected = torch.full((3, 3), 0.1)
    expected[1, 1] = 0.2
    torch.testing.assert_close(layer2_kernel, expected)
    torch.testing.assert_close(folded[1][0], torch.full((512, 2, 3, 3), 1 / 18))
    assert patch_embedder._groups == (512, 512)
    assert "pool_kernel2" not in patch_embedder.state_dict()  # not part of the weights (nor their checksum)


@pytest.mark.parametrize("batch", [1, 3])
def test_folded_embedding_equals_the_literal_computation(random_backbone, patch_embedder, batch):
    torch.manual_seed(batch)
    with torch.no_grad():
        layer2, layer3 = random_backbone(torch.randn(batch, 3, 224, 224))
        fast = patch_embedder.embed_features(layer2, layer3)
        literal = patch_embedder.embed_features_reference(layer2, layer3)
    assert fast.shape == literal.shape == (batch, 784, 1024)
    torch.testing.assert_close(fast, literal, rtol=1e-5, atol=1e-6 * float(literal.abs().max()))


def test_folding_matches_pool_to_on_random_maps():
    """Beyond WRN-50: a small layout that folds, checked against the literal pooling in float64."""
    channels, dim = (8, 16), 16
    folded = folded_pooling(channels, dim)
    assert folded is not None

    class Tiny(torch.nn.Module):
        feature_info = None

    embedder = PatchEmbedder(Tiny(), embed_dim=dim)
    embedder.register_buffer("pool_kernel2", folded[0][0].double(), persistent=False)
    embedder.register_buffer("pool_kernel3", folded[1][0].double(), persistent=False)
    embedder._groups = (folded[0][1], folded[1][1])
    layer2, layer3 = torch.randn(2, 8, 6, 6, dtype=torch.float64), torch.randn(2, 16, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(
        embedder.embed_features(layer2, layer3), embedder.embed_features_reference(layer2, layer3)
    )
    assert pool_to(torch.ones(1, 8 * 9, dtype=torch.float64), dim).shape == (1, dim)


def test_layouts_that_do_not_fold_use_the_literal_computation():
    assert folded_pooling((48, 96), 64) is None  # windows straddle channels

    class NoInfo(torch.nn.Module):
        def forward(self, images):
            return [images, images]

    embedder = PatchEmbedder(NoInfo(), embed_dim=16)
    assert embedder._groups is None
    layer2, layer3 = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(
        embedder.embed_features(layer2, layer3), embedder.embed_features_reference(layer2, layer3)
    )
