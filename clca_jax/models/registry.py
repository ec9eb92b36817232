"""Backbone registry: timm model names and tags -> the architecture attributes we build.

Users name backbones exactly as timm does, with or without the pretrained tag
(`vit_base_patch16_224.orig_in21k`, `deit3_base_patch16_224.fb_in1k`,
`vit_base_patch16_clip_224.laion2b`). The tag selects weights, never the architecture, so it is
accepted as given; it does select the input normalisation the weights were trained with
(`pretrained_normalization`). `tests/test_registry.py` checks every entry against the timm model
of the same name, and every tag's normalisation against timm's pretrained configs.
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
      layer_scale: LayerScale initial value, or None without LayerScale (DeiT-3: 1e-6,
        DINOv2: 1e-5).
      reg_tokens: DINOv2's register tokens, after the class token and never reduced (timm
        `reg_tokens`; not CLCA's CLR tokens).
      global_pool: what the plain classifier reads: "token" (the class token after the final
        LayerNorm) or "avg" (the mean of the tokens after the class and register tokens,
        then the LayerNorm `fc_norm`; timm's `global_pool='avg'` with its default `fc_norm`).
      normalization: the input normalisation of the family's weights (a key of
        `clca_jax.data.NORMALIZATION`); some tags differ (`pretrained_normalization`).
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
    reg_tokens: int = 0
    global_pool: str = "token"
    normalization: str = "inception"

    @property
    def num_prefix_tokens(self) -> int:
        """The class token and the register tokens (timm's `num_prefix_tokens`)."""
        return 1 + self.reg_tokens

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
        normalization="imagenet",
    ),
    **_family(
        "vit_{size}_patch{patch}_{res}_miil",
        [("base", 16, 224)],
        qkv_bias=False,
        normalization="zero_one",
    ),
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
        normalization="imagenet",
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
        normalization="clip",
    ),
    # DINOv2 (lvd142m): LayerScale, patch 14, weights trained on a 37 x 37 grid (518 px).
    **_family(
        "vit_{size}_patch{patch}_dinov2",
        [("small", 14, 518), ("base", 14, 518), ("large", 14, 518)],
        layer_scale=1e-5,
        normalization="imagenet",
    ),
    # DINOv2 with 4 register tokens; neither they nor the class token get a position embedding.
    **_family(
        "vit_{size}_patch{patch}_reg4_dinov2",
        [("small", 14, 518), ("base", 14, 518), ("large", 14, 518)],
        layer_scale=1e-5,
        reg_tokens=4,
        no_embed_class=True,
        normalization="imagenet",
    ),
    # EVA-L (MIM pretrained, fine-tuned): a class token, but classified from the mean token.
    **_family(
        "eva_{size}_patch{patch}_{res}",
        [("large", 14, 196), ("large", 14, 336)],
        global_pool="avg",
        normalization="clip",
    ),
}

# Tags whose weights were trained with other constants than their family's (timm's pretrained
# configs); `tests/test_registry.py` checks every tag timm lists for a registered name.
_TAG_NORMALIZATION = {"dino": "imagenet", "mae": "imagenet", "bamboo": "clip"}
_NAME_TAG_NORMALIZATION = {
    f"vit_large_patch14_clip_{res}.laion2b{tune}": "inception"
    for res, tune in [
        (224, ""),
        (224, "_ft_in1k"),
        (224, "_ft_in12k"),
        (224, "_ft_in12k_in1k"),
        (336, "_ft_in1k"),
        (336, "_ft_in12k_in1k"),
    ]
}

# Families without a class token, which CLCA needs (README, "Backbones without a class token").
_NO_CLASS_TOKEN = ("siglip", "_gap_", "_gap", "_map_", "aimv2", "_rpn_")


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
    if name not in _BACKBONES and any(part in name for part in _NO_CLASS_TOKEN):
        raise ValueError(
            f"Backbone {backbone!r} has no class token (timm class_token=False, a 'map' or "
            "'avg' pooled head), which CLCA needs: its CLA head reads the class token at "
            "several depths and the token reductions rank tokens by class attention; pick a "
            "backbone with a class token (see clca_jax.models.list_backbones())."
        )
    if name not in _BACKBONES:
        family = name.split("_")[0]
        close = sorted(n for n in _BACKBONES if n.startswith(family)) or sorted(_BACKBONES)
        raise ValueError(
            f"Unknown backbone {backbone!r}. Use a timm model name (optionally with its "
            f"pretrained tag, e.g. 'vit_base_patch16_224.orig_in21k'). Registered names like it: "
            f"{', '.join(close)}."
        )
    return _BACKBONES[name]


def pretrained_normalization(backbone: str) -> str:
    """The normalisation (a key of `clca_jax.data.NORMALIZATION`) of a `name.tag`'s weights.

    Raises:
      ValueError: the name has no tag, so the weights (and their constants) are unknown.
    """
    name, tag = split_tag(backbone)
    arch = get_backbone(name)
    if not tag:
        raise ValueError(
            f"model.normalization='backbone' needs the pretrained tag in model.backbone, "
            f"which selects the weights and so their constants; got {backbone!r} (e.g. "
            f"'{name}.<tag>', a timm pretrained tag)."
        )
    return _NAME_TAG_NORMALIZATION.get(backbone, _TAG_NORMALIZATION.get(tag, arch.normalization))


def list_backbones() -> list[str]:
    """All registered timm model names (without tags)."""
    return sorted(_BACKBONES)
