"""Logit check of a conversion against the PyTorch timm model (needs the torch extra)."""

from __future__ import annotations

import ml_collections
import numpy as np

from clca_jax.models import create_model
from clca_jax.models.registry import split_tag


def build_timm_model(model_config: ml_collections.ConfigDict):
    """The timm model of the same architecture, size and head, random weights, eval mode."""
    import timm

    kwargs = {"img_size": model_config.img_size, "num_classes": model_config.num_classes}
    for field in ("embed_dim", "depth", "num_heads"):
        if model_config.get(field) is not None:
            kwargs[field] = model_config[field]
    name, _ = split_tag(model_config.backbone)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def compare_with_timm(
    timm_state: dict[str, np.ndarray],
    variables: dict,
    model_config: ml_collections.ConfigDict,
    batch: int = 2,
    seed: int = 0,
) -> float:
    """Max |difference| of the logits of the converted model and timm's on random images.

    The timm model gets the checkpoint's tensors with the converted position embedding and
    head, so this checks the architecture and key mapping; the resampling itself is checked
    against PyTorch's interpolation in the test suite.
    """
    import torch

    model = build_timm_model(model_config)
    params = variables["params"]
    state = {key: torch.from_numpy(np.asarray(value)) for key, value in timm_state.items()}
    state["pos_embed"] = torch.from_numpy(np.asarray(params["pos_embed"]))
    state["head.weight"] = torch.from_numpy(np.asarray(params["head"]["kernel"]).T.copy())
    state["head.bias"] = torch.from_numpy(np.asarray(params["head"]["bias"]))
    model.load_state_dict(state, strict=True)
    size = model_config.img_size
    images = np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    logits, _ = create_model(model_config).apply(variables, images)
    return float(np.abs(np.asarray(logits) - expected).max())
