"""Random-weight timm models and checkpoints for parity tests (needs the torch extra)."""

from __future__ import annotations

import numpy as np
import timm
import torch

# Small sizes for CI: every architecture variant at width 64, 2 heads, depth 2.
TINY = {"embed_dim": 64, "depth": 2, "num_heads": 2}


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrites every parameter with random values of a sensible scale.

    timm's own init leaves LayerScale at 1e-6 and LayerNorms at identity, which would hide a
    wrong mapping of those tensors; random values make every tensor matter.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("gamma"):
                param.copy_(0.5 + 0.2 * noise)
            elif param.ndim == 1 and name.endswith("weight"):  # LayerNorm scale
                param.copy_(1.0 + 0.2 * noise)
            elif param.ndim == 1:  # biases
                param.copy_(0.05 * noise)
            elif "pos_embed" in name or "cls_token" in name:
                param.copy_(0.5 * noise)
            else:
                fan_in = param[0].numel()
                param.copy_(noise / np.sqrt(fan_in))
    return model


def make_timm_model(name: str, img_size: int, num_classes: int, seed: int = 0, **sizes):
    """A timm model with random weights in eval mode."""
    model = timm.create_model(
        name, pretrained=False, img_size=img_size, num_classes=num_classes, **sizes
    )
    return randomize_(model, seed).eval()


def timm_logits(model: torch.nn.Module, images_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)).numpy()


def random_images(batch: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def save_state_dict(state: dict, path: str) -> str:
    """Saves a torch state dict as .safetensors, or with torch.save for other suffixes."""
    state = {key: value.detach().contiguous() for key, value in state.items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save(state, path)
    return path


def to_openclip(state: dict) -> dict:
    """A timm CLIP image tower in OpenCLIP's key layout, plus a stand-in text tower."""
    renames = [
        ("patch_embed.proj", "conv1"),
        ("norm_pre", "ln_pre"),
        ("blocks.", "transformer.resblocks."),
        (".norm1", ".ln_1"),
        (".norm2", ".ln_2"),
        ("attn.qkv.weight", "attn.in_proj_weight"),
        ("attn.qkv.bias", "attn.in_proj_bias"),
        ("attn.proj", "attn.out_proj"),
        ("mlp.fc1", "mlp.c_fc"),
        ("mlp.fc2", "mlp.c_proj"),
    ]
    out = {}
    for key, value in state.items():
        if key.startswith("head."):
            if key == "head.weight":
                out["visual.proj"] = value.T
            continue
        if key == "cls_token":
            out["visual.class_embedding"] = value.reshape(-1)
            continue
        if key == "pos_embed":
            out["visual.positional_embedding"] = value[0]
            continue
        if key.startswith("norm."):
            out["visual." + key.replace("norm.", "ln_post.")] = value
            continue
        for old, new in renames:
            key = key.replace(old, new)
        out["visual." + key] = value
    # Text-tower tensors a real OpenCLIP file carries; the converter must drop them.
    out["positional_embedding"] = torch.zeros(77, 32)
    out["token_embedding.weight"] = torch.zeros(100, 32)
    out["transformer.resblocks.0.ln_1.weight"] = torch.ones(32)
    out["text_projection"] = torch.zeros(32, 16)
    out["logit_scale"] = torch.tensor(4.6)
    return out
