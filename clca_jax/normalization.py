"""Input normalisation constants of the pretrained backbones, per channel on the 0..1 scale.

`model.normalization` picks one by name: the reference normalises every backbone with ImageNet's
(`imagenet`, the default); `backbone` takes the constants the backbone's weights were trained
with (`clca_jax.models.registry.pretrained_normalization`), e.g. CLIP's for CLIP weights.
"""

from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
# MIIL's ImageNet-21k weights read pixels scaled to 0..1 and nothing else.
ZERO_ONE_MEAN = (0.0, 0.0, 0.0)
ZERO_ONE_STD = (1.0, 1.0, 1.0)
NORMALIZATION = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "clip": (CLIP_MEAN, CLIP_STD),
    "inception": (INCEPTION_MEAN, INCEPTION_STD),
    "zero_one": (ZERO_ONE_MEAN, ZERO_ONE_STD),
}
DEFAULT = "imagenet"
BACKBONE = "backbone"  # the backbone's own constants, from its pretrained tag
CHOICES = (*NORMALIZATION, BACKBONE)
