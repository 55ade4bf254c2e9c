"""The one place that loads the expert's backbone: from the Hugging Face hub, a local file, or seeded random.

The backbone is timm's WideResNet-50-2 (``wide_resnet50_2.tv_in1k``: torchvision's ImageNet-1k V1
weights) cut after ``layer3`` (``features_only``, feature indices 2 and 3 = ``layer2`` and ``layer3``).

* ``weights="hub"``: timm ``pretrained=True`` through huggingface-hub; the HF cache (``HF_HOME``) and
  ``HF_HUB_OFFLINE=1`` are honoured. No network and nothing cached → :class:`BackboneWeightsError`.
* ``weights="file"``: a ``.safetensors`` file holding the full timm model's state dict (the hub's
  ``model.safetensors``) or just the feature extractor's. Never unpickled: other formats are refused.
* ``weights="random"``: seeded random initialisation, only when asked for explicitly (tests, smoke runs).

Every loaded backbone comes with a :class:`WeightsInfo` whose ``checksum`` (sha256 over the state dict in
sorted-key order) is recorded in banks, so a bank can never silently be scored with other weights.

Example:
    >>> from expert.config import ExpertSettings
    >>> module, info = load_backbone(ExpertSettings(weights="random", seed=0))
    >>> info.source
    'random:seed=0'
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from expert.config import ExpertSettings
from expert.errors import ExpertError

FEATURE_INDICES: tuple[int, int] = (2, 3)
"""timm ``features_only`` indices of ResNet ``layer2`` (stride 8) and ``layer3`` (stride 16)."""

_HOW_TO_FIX = (
    "run once with internet access so the Hugging Face cache is filled, copy a filled HF cache and point HF_HOME "
    "at it, or download model.safetensors and set EAGLE_EXPERT__WEIGHTS=file and "
    "EAGLE_EXPERT__WEIGHTS_PATH=/path/to/model.safetensors"
)


class BackboneWeightsError(ExpertError, RuntimeError):
    """The backbone's weights cannot be loaded; the one-line message says how to provide them."""

    code = "backbone_unavailable"


@dataclass(frozen=True)
class WeightsInfo:
    """Where the backbone's weights came from and a checksum of them.

    Attributes:
        source: ``"hub:<timm name>"``, ``"file:<absolute path>"`` or ``"random:seed=<seed>"``.
        checksum: ``"sha256:<hex>"`` over the feature extractor's state dict (see :func:`state_dict_checksum`).
    """

    source: str
    checksum: str

    @property
    def is_random(self) -> bool:
        """True for random weights (a bank built with them is for tests and smoke runs only)."""
        return self.source.startswith("random:")


def state_dict_checksum(module: torch.nn.Module) -> str:
    """Return ``"sha256:<hex>"`` over a module's state dict.

    For each key in sorted order, the key, dtype, shape and the tensor's raw bytes are hashed.

    Example:
        >>> state_dict_checksum(torch.nn.Linear(2, 2)).startswith("sha256:")
        True
    """
    digest = hashlib.sha256()
    state = module.state_dict()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def _create(name: str, *, pretrained: bool, **kwargs: Any) -> torch.nn.Module:
    import timm

    return timm.create_model(name, pretrained=pretrained, features_only=True, out_indices=FEATURE_INDICES, **kwargs)


def _load_hub(name: str) -> torch.nn.Module:
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return _create(name, pretrained=True)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError, ConnectionError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        reason = reason if len(reason) <= 100 else reason[:99] + "…"
        raise BackboneWeightsError(
            f"cannot load backbone weights {name!r} from the Hugging Face hub ({type(err).__name__}: {reason}); "
            + _HOW_TO_FIX
        ) from None


def _load_file(name: str, path: Path) -> torch.nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.suffix.lower() != ".safetensors":
        raise BackboneWeightsError(
            f"backbone weights file {str(path)!r} is not a .safetensors file; only safetensors is accepted "
            "(never pickled checkpoints): download model.safetensors from the hub model page"
        )
    if not path.is_file():
        raise BackboneWeightsError(f"backbone weights file {str(path)!r} does not exist; " + _HOW_TO_FIX)
    try:
        loaded = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        message = f"backbone weights file {str(path)!r} is not a readable safetensors file: {err}"
        raise BackboneWeightsError(message) from None
    module = _create(name, pretrained=False)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise BackboneWeightsError(
            f"backbone weights file {str(path)!r} does not fit {name!r}: {len(missing)} tensors missing "
            f"(first: {missing[0]!r})"
        )
    wrong = [k for k in expected if tuple(loaded[k].shape) != tuple(expected[k].shape)]
    if wrong:
        raise BackboneWeightsError(
            f"backbone weights file {str(path)!r} does not fit {name!r}: tensor {wrong[0]!r} has shape "
            f"{tuple(loaded[wrong[0]].shape)}, expected {tuple(expected[wrong[0]].shape)}"
        )
    # Extra tensors (layer4, fc of the full classifier) are not needed by the feature extractor.
    module.load_state_dict({k: loaded[k] for k in expected}, strict=True)
    return module


def _load_random(name: str, seed: int) -> torch.nn.Module:
    # fork_rng: seeding must not disturb the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _create(name, pretrained=False)


def load_backbone(settings: ExpertSettings) -> tuple[torch.nn.Module, WeightsInfo]:
    """Load the feature extractor (WideResNet-50-2 up to ``layer3``) as the settings say, in eval mode.

    Args:
        settings: the expert settings (or any object whose ``expert`` attribute holds them, such as the
            application's settings root): ``backbone``, ``weights``, ``weights_path``, ``seed``.

    Returns:
        ``(module, info)``: a timm ``features_only`` module returning ``[layer2, layer3]`` feature maps,
        and where its weights came from with their checksum.

    Raises:
        BackboneWeightsError: weights unavailable (offline with an empty cache, missing or non-safetensors
            file, tensors that do not fit); the one-line message says how to provide them.

    Example:
        >>> from expert.config import ExpertSettings
        >>> module, info = load_backbone(ExpertSettings(weights="random"))
        >>> [tuple(f.shape) for f in module(torch.zeros(1, 3, 224, 224))]
        [(1, 512, 28, 28), (1, 1024, 14, 14)]
    """
    expert = getattr(settings, "expert", settings)
    name = expert.backbone
    if expert.weights == "hub":
        module, source = _load_hub(name), f"hub:{name}"
    elif expert.weights == "file":
        assert expert.weights_path is not None  # validated by ExpertSettings: weights=file needs a path
        path = Path(expert.weights_path).expanduser().resolve()
        module, source = _load_file(name, path), f"file:{path}"
    elif expert.weights == "random":
        module, source = _load_random(name, expert.seed), f"random:seed={expert.seed}"
    else:  # pragma: no cover - the settings' Literal forbids it
        raise BackboneWeightsError(f"unknown weights source {expert.weights!r}; expected hub, file or random")
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module, WeightsInfo(source=source, checksum=state_dict_checksum(module))


HUB_WEIGHT_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
"""The files timm fetches from a hub repository for pretrained weights, in the order it tries them."""


def hub_weights_source(name: str) -> tuple[str, str | None]:
    """The Hugging Face hub repository (and revision, ``None`` for ``main``) timm loads ``name``'s weights from.

    This is timm's own resolution (the model's pretrained config), so a check of the cache looks where
    :func:`load_backbone` with ``weights="hub"`` will look; nothing is downloaded.

    Raises:
        BackboneWeightsError: timm knows no hub weights for ``name``.

    Example:
        >>> hub_weights_source("wide_resnet50_2.tv_in1k")
        ('timm/wide_resnet50_2.tv_in1k', None)
    """
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except (RuntimeError, ValueError):
        cfg = None
    hub_id = getattr(cfg, "hf_hub_id", None)
    if not hub_id:
        raise BackboneWeightsError(f"timm has no Hugging Face hub weights for {name!r}")
    repo, _, revision = hub_id.partition("@")
    return repo, revision or None
