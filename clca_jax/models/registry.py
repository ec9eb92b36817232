"""Backbone registry: timm model names and tags -> the architecture attributes we build.

Users name backbones exactly as timm does, with or without the pretrained tag
(`vit_base_patch16_224.orig_in21k`, `deit3_base_patch16_224.fb_in1k`,
`vit_base_patch16_clip_224.laion2b`). The tag selects weights, never the architecture, so it is
accepted as given. `tests/test_registry.py` checks every entry against the timm model of the same
name.
"""

from __future__ import annotations

import dataclasses

# (embed_dim, depth, num_heads) of the standard sizes.
_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "medium": (512, 12, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}


@dataclasses.dataclass(frozen=True)
class Backbone:
    """Architecture attributes of one ViT variant.

    Attributes:
      name: timm model name without the pretrained tag.
      embed_dim: token width D.
      depth: number of transformer blocks.
      num_heads: attention heads (head dim = embed_dim // num_heads).
      patch_size: square patch side in pixels.
      img_size: the image side the pretrained weights were trained at.
      mlp_ratio: MLP hidden width over embed_dim.
      qkv_bias: whether the fused qkv projection has a bias (False for MIIL).
      ln_eps: epsilon of every LayerNorm in the backbone (1e-5 for CLIP, else 1e-6).
      patch_bias: whether the patch-embedding convolution has a bias (False for CLIP).
      no_embed_class: position embedding covers patches only; the class token gets none (DeiT-3).
      pre_norm: LayerNorm on the embedded sequence before the blocks (CLIP).
      layer_scale: LayerScale initial value, or None without LayerScale (DeiT-3: 1e-6).
    """

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    img_size: int = 224
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ln_eps: float = 1e-6
    patch_bias: bool = True
    no_embed_class: bool = False
    pre_norm: bool = False
    layer_scale: float | None = None

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


def _family(template: str, sizes_patches_res, **attrs) -> dict[str, Backbone]:
    """Entries named by `template` (fields size, patch, res) for each (size, patch, res)."""
    entries = {}
    for size, patch, res in sizes_patches_res:
        embed_dim, depth, num_heads = _SIZES[size]
        name = template.format(size=size, patch=patch, res=res)
        entries[name] = Backbone(
            name=name,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            patch_size=patch,
            img_size=res,
            **attrs,
        )
    return entries


_BACKBONES: dict[str, Backbone] = {
    # Original ViT, AugReg, DINO, MAE, MoCo v3 weights all use this architecture.
    **_family(
        "vit_{size}_patch{patch}_{res}",
        [
            ("tiny", 16, 224),
            ("tiny", 16, 384),
            ("small", 16, 224),
            ("small", 16, 384),
            ("small", 8, 224),
            ("base", 16, 224),
            ("base", 16, 384),
            ("base", 8, 224),
            ("base", 32, 224),
            ("large", 16, 224),
            ("large", 16, 384),
            ("huge", 14, 224),
        ],
    ),
    **_family(
        "deit_{size}_patch{patch}_{res}",
        [("tiny", 16, 224), ("small", 16, 224), ("base", 16, 224), ("base", 16, 384)],
    ),
    **_family("vit_{size}_patch{patch}_{res}_miil", [("base", 16, 224)], qkv_bias=False),
    **_family(
        "deit3_{size}_patch{patch}_{res}",
        [
            ("small", 16, 224),
            ("small", 16, 384),
            ("medium", 16, 224),
            ("base", 16, 224),
            ("base", 16, 384),
            ("large", 16, 224),
            ("large", 16, 384),
            ("huge", 14, 224),
        ],
        no_embed_class=True,
        layer_scale=1e-6,
    ),
    **_family(
        "vit_{size}_patch{patch}_clip_{res}",
        [
            ("base", 16, 224),
            ("base", 16, 384),
            ("base", 32, 224),
            ("large", 14, 224),
            ("large", 14, 336),
        ],
        pre_norm=True,
        ln_eps=1e-5,
        patch_bias=False,
    ),
}


def split_tag(backbone: str) -> tuple[str, str]:
    """Splits `name.tag` into (name, tag); the tag is '' when absent."""
    name, _, tag = backbone.partition(".")
    return name, tag


def get_backbone(backbone: str) -> Backbone:
    """Returns the architecture of a timm model name or `name.tag`.

    Raises:
      ValueError: the name is not registered; the message lists close names.
    """
    name, _ = split_tag(backbone)
    if name not in _BACKBONES:
        family = name.split("_")[0]
        close = sorted(n for n in _BACKBONES if n.startswith(family)) or sorted(_BACKBONES)
        raise ValueError(
            f"Unknown backbone {backbone!r}. Use a timm model name (optionally with its "
            f"pretrained tag, e.g. 'vit_base_patch16_224.orig_in21k'). Registered names like it: "
            f"{', '.join(close)}."
        )
    return _BACKBONES[name]


def list_backbones() -> list[str]:
    """All registered timm model names (without tags)."""
    return sorted(_BACKBONES)
