"""PatchCore's patch embedding on top of the WideResNet-50-2 ``layer2`` and ``layer3`` feature maps.

Exactly as the PatchCore/EAGLE reference code (DESIGN.md "Expert"):

1. each layer's map is unfolded into 3×3 neighbourhoods (stride 1, zero padding 1): a ``C·9`` vector per
   position, ordered channel-major ``(c, ky, kx)``;
2. ``layer3``'s 14×14 grid of neighbourhood vectors is bilinearly resized (``align_corners=False``) to
   ``layer2``'s 28×28 grid;
3. each layer's ``C·9`` vector is adaptive-average-pooled (1-D) to 1024 values;
4. the two are concatenated (2048) and adaptive-average-pooled to 1024.

For a 224×224 input that gives 784 patches × 1024 values per image, patches in row-major grid order.

Example:
    >>> from eagle.settings import ExpertSettings
    >>> from expert.weights import load_backbone
    >>> embedder = build_patch_embedder(load_backbone(ExpertSettings(weights="random"))[0])
    >>> tuple(embedder(torch.zeros(2, 3, 224, 224)).shape), embedder.grid_size
    ((2, 784, 1024), (28, 28))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EMBED_DIM = 1024
"""Length of one patch feature (each layer's pooled size and the final size)."""

NEIGHBOURHOOD = 3
"""Side of the local neighbourhood aggregated per patch."""


def local_neighbourhoods(feature_map: torch.Tensor) -> torch.Tensor:
    """Unfold a ``[B, C, H, W]`` map into ``[B, C·9, H, W]`` 3×3 neighbourhoods (stride 1, zero pad 1).

    Channel ``c·9 + ky·3 + kx`` of position ``(y, x)`` holds ``feature_map[c, y+ky-1, x+kx-1]`` (0 outside).

    Example:
        >>> local_neighbourhoods(torch.ones(1, 2, 4, 5)).shape
        torch.Size([1, 18, 4, 5])
    """
    batch, channels, height, width = feature_map.shape
    unfolded = F.unfold(feature_map, kernel_size=NEIGHBOURHOOD, stride=1, padding=NEIGHBOURHOOD // 2, dilation=1)
    return unfolded.reshape(batch, channels * NEIGHBOURHOOD * NEIGHBOURHOOD, height, width)


def pool_to(vectors: torch.Tensor, size: int) -> torch.Tensor:
    """Adaptive-average-pool the last dimension of ``[N, L]`` to ``[N, size]``.

    Output ``i`` is the mean of inputs ``floor(i·L/size) … ceil((i+1)·L/size) - 1``.

    Example:
        >>> pool_to(torch.arange(6.0).reshape(1, 6), 3)
        tensor([[0.5000, 2.5000, 4.5000]])
    """
    return F.adaptive_avg_pool1d(vectors.unsqueeze(1), size).squeeze(1)


class PatchEmbedder(torch.nn.Module):
    """Image batch ``[B, 3, 224, 224]`` (ImageNet-normalised float32) → patch features ``[B, 784, 1024]``.

    Attributes:
        backbone: a timm ``features_only`` module returning ``[layer2, layer3]`` maps.
        grid_size: ``(28, 28)``, the patch grid of a 224×224 input (layer2's stride is 8).
        embed_dim: 1024.
    """

    def __init__(self, backbone: torch.nn.Module, *, input_size: int = 224, embed_dim: int = EMBED_DIM):
        super().__init__()
        self.backbone = backbone
        self.embed_dim = embed_dim
        reductions = _reductions(backbone)
        self.grid_size: tuple[int, int] = (input_size // reductions[0], input_size // reductions[0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed a batch ``[B, 3, H, W]`` → ``[B, (H/8)·(W/8), 1024]``."""
        layer2, layer3 = self.backbone(images)[:2]
        return self.embed_features(layer2, layer3)

    def embed_features(self, layer2: torch.Tensor, layer3: torch.Tensor) -> torch.Tensor:
        """Patch features from the raw ``layer2`` ``[B, C2, h, w]`` and ``layer3`` ``[B, C3, h', w']`` maps.

        See the module docstring for the exact computation; the result is ``[B, h·w, embed_dim]``.
        """
        batch, _, height, width = layer2.shape
        near2 = local_neighbourhoods(layer2)
        near3 = F.interpolate(local_neighbourhoods(layer3), size=(height, width), mode="bilinear", align_corners=False)
        per_layer = []
        for near in (near2, near3):
            vectors = near.flatten(2).transpose(1, 2).reshape(batch * height * width, near.shape[1])
            per_layer.append(pool_to(vectors, self.embed_dim))
        stacked = torch.stack(per_layer, dim=1).reshape(batch * height * width, 2 * self.embed_dim)
        return pool_to(stacked, self.embed_dim).reshape(batch, height * width, self.embed_dim)


def _reductions(backbone: torch.nn.Module) -> list[int]:
    info = getattr(backbone, "feature_info", None)
    if info is not None and hasattr(info, "reduction"):
        return list(info.reduction())
    return [8, 16]


def build_patch_embedder(backbone: torch.nn.Module, *, input_size: int = 224) -> PatchEmbedder:
    """Wrap a loaded backbone (see :func:`expert.weights.load_backbone`) into an eval-mode :class:`PatchEmbedder`.

    Args:
        backbone: timm ``features_only`` WideResNet-50-2 returning ``[layer2, layer3]``.
        input_size: the square network input size (the crop), 224 by default.
    """
    return PatchEmbedder(backbone, input_size=input_size).eval()
