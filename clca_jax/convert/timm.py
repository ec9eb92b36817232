"""timm / OpenCLIP state dicts -> Flax variables of `clca_jax.models.VisionTransformer`.

The Flax tree mirrors timm's module names, so the mapping is mechanical: `blocks_3/attn/qkv/kernel`
is `blocks.3.attn.qkv.weight` transposed. The converter walks the *model's* parameter tree (from
`jax.eval_shape`), takes each leaf from the checkpoint, and accounts for every checkpoint key:
mapped, deliberately dropped (reported), or unknown (an error).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Mapping

import jax
import ml_collections
import numpy as np

from clca_jax.convert.adapt import Report, adapt_pos_embed
from clca_jax.models import VisionTransformer, create_model
from clca_jax.models.clca import clr_from_class_token
from clca_jax.models.config import NO_HEAD
from clca_jax.models.reduction import Method, NoReduction
from clca_jax.models.registry import Backbone


class ConversionError(ValueError):
    """The checkpoint cannot become the requested model; the message says which key and why."""


# ---------------------------------------------------------------------------------------------
# Reading checkpoints


def load_state_dict(path: str, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """Reads a `.safetensors`, `.pth`, `.pt` or `.bin` state dict as float32 NumPy arrays.

    A dict holding the state dict under `model` or `state_dict` (training checkpoints) is
    unwrapped. `.pth`/`.bin` need PyTorch (`pip install clca_jax[torch]`). Only tensors and
    plain containers are unpickled unless `trust_pickle` (training checkpoints that also store
    Python objects such as argparse namespaces; use only for files you trust). A tensor holding
    NaN or infinite values (also after the cast to float32) is refused, naming it.
    """
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise ConversionError(f"checkpoint {path} {what}; pass the weights file to --checkpoint.")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            state = load_file(path)
        except Exception as error:  # safetensors raises its own untyped errors
            raise ConversionError(f"Cannot read {path} as safetensors: {error}") from error
    else:
        state = _load_torch_file(path, trust_pickle)
    with np.errstate(over="ignore"):  # an overflow shows as inf, refused below
        arrays = {key: np.asarray(value, dtype=np.float32) for key, value in state.items()}
    bad = {key: value for key, value in arrays.items() if not np.isfinite(value).all()}
    if bad:
        key, value = next(iter(bad.items()))
        others = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
        raise ConversionError(
            f"{path}: tensor {key!r} holds {int(np.isnan(value).sum())} NaN and "
            f"{int(np.isinf(value).sum())} infinite value(s) in float32{others}; the checkpoint "
            "is damaged or comes from a diverged run. Convert another checkpoint."
        )
    return arrays


# What a torch.save file starts with: a zip archive (current format) or a pickle (legacy).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def _load_torch_file(path: str, trust_pickle: bool) -> Mapping:
    with open(path, "rb") as f:
        start = f.read(32)
    if not start:
        raise ConversionError(f"{path} is empty; download or save the checkpoint again.")
    if start[8:10] == b'{"':
        raise ConversionError(f"{path} is a safetensors file; name it .safetensors to convert it.")
    if start.startswith(b"version https://git-lfs"):
        raise ConversionError(
            f"{path} is a Git LFS pointer, not the weights; fetch them with `git lfs pull`."
        )
    if not start.startswith(_TORCH_MAGIC):
        raise ConversionError(
            f"{path} is not a PyTorch checkpoint: a torch.save file is a zip archive or a "
            f"pickle, this one starts with {start[:12]!r}. Check that it is the weights file "
            "itself (not a text or HTML page saved in its place)."
        )
    try:
        import torch
    except ImportError as error:
        raise ConversionError(
            f"Reading {path} needs PyTorch: pip install 'clca_jax[torch]' "
            "(or convert the file to .safetensors first)."
        ) from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as error:  # torch raises many types for truncated or foreign files
        hint = ""
        if "weights_only" in str(error) and not trust_pickle:
            hint = (
                " The file holds Python objects besides tensors (e.g. training arguments); if "
                "you trust it, convert with --trust_pickle."
            )
        raise ConversionError(
            f"Cannot read {path} as a PyTorch checkpoint: {str(error).splitlines()[0]}{hint}"
        ) from error
    for wrapper in ("model", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise ConversionError(f"{path} holds a {type(state).__name__}, not a state dict.")
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor."
            )
        tensors[key] = value.detach().float().numpy()
    return tensors


# ---------------------------------------------------------------------------------------------
# OpenCLIP -> timm names

_OPENCLIP_RENAMES = (
    ("conv1", "patch_embed.proj"),
    ("positional_embedding", "pos_embed"),
    ("class_embedding", "cls_token"),
    ("transformer.resblocks.", "blocks."),
    ("ln_pre", "norm_pre"),
    ("ln_post", "norm"),
    ("ln_1", "norm1"),
    ("ln_2", "norm2"),
    ("attn.in_proj_weight", "attn.qkv.weight"),
    ("attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.out_proj", "attn.proj"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
)


def is_openclip(state: Mapping[str, np.ndarray]) -> bool:
    """True for an OpenCLIP state dict (image tower under `visual.`)."""
    return any(key.startswith(("visual.", "module.visual.")) for key in state)


def openclip_to_timm(
    state: Mapping[str, np.ndarray], report: Report | None = None
) -> dict[str, np.ndarray]:
    """Renames an OpenCLIP image tower to timm keys; the text tower is dropped (reported)."""
    report = report if report is not None else Report()
    out = {}
    for key, value in state.items():
        name = key.removeprefix("module.")
        if not name.startswith("visual."):
            report.drop(key, "not part of the image tower")
            continue
        name = name.removeprefix("visual.")
        if name == "proj":
            # The image-text projection: timm keeps it as a (discarded) 512-way head.
            out["head.weight"], out["head.bias"] = value.T, np.zeros(value.shape[1], np.float32)
            continue
        for old, new in _OPENCLIP_RENAMES:
            name = name.replace(old, new)
        if name == "cls_token":
            value = value.reshape(1, 1, -1)
        elif name == "pos_embed":
            value = value[None]
        out[name] = value
    return out


# ---------------------------------------------------------------------------------------------
# Architecture check


def describe_checkpoint(state: Mapping[str, np.ndarray]) -> dict:
    """Architecture facts readable from a timm-format state dict (for error messages)."""
    facts = {}
    if "patch_embed.proj.weight" in state:
        width, _, patch, _ = state["patch_embed.proj.weight"].shape
        facts.update(embed_dim=int(width), patch_size=int(patch))
    block_ids = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if block_ids:
        facts["depth"] = max(block_ids) + 1
    facts["qkv_bias"] = "blocks.0.attn.qkv.bias" in state
    facts["pre_norm"] = "norm_pre.weight" in state
    facts["layer_scale"] = "blocks.0.ls1.gamma" in state
    facts["patch_bias"] = "patch_embed.proj.bias" in state
    facts["reg_tokens"] = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    facts["global_pool"] = "avg" if "fc_norm.weight" in state else "token"
    return facts


# Keys every timm-format ViT state dict has (OpenCLIP ones after renaming).
_VIT_KEYS = {"patch_embed.proj.weight": 4, "blocks.0.attn.qkv.weight": 2}


def check_is_vit(state: Mapping[str, np.ndarray]) -> None:
    """Raises ConversionError when `state` is not a Vision Transformer state dict at all."""
    wrong = [
        key for key, ndim in _VIT_KEYS.items() if key not in state or np.ndim(state[key]) != ndim
    ]
    if not wrong:
        return
    prefixed = [k for k in state if k.endswith(".patch_embed.proj.weight")]
    hint = ""
    if prefixed:
        hint = f" Its keys carry the prefix {prefixed[0][: -len('patch_embed.proj.weight')]!r}; "
        hint += "save the state dict without it."
    raise ConversionError(
        f"The checkpoint is not a timm Vision Transformer state dict: it lacks {wrong} (or they "
        f"have another shape); its first keys are {sorted(state)[:4]}.{hint} Convert a ViT, "
        "DeiT-3, CLIP or CLCA checkpoint."
    )


def check_architecture(state: Mapping[str, np.ndarray], backbone: Backbone, model_name: str):
    """Raises ConversionError listing every architecture fact that disagrees with the model."""
    check_is_vit(state)
    facts = describe_checkpoint(state)
    expected = {
        "embed_dim": backbone.embed_dim,
        "patch_size": backbone.patch_size,
        "depth": backbone.depth,
        "qkv_bias": backbone.qkv_bias,
        "pre_norm": backbone.pre_norm,
        "layer_scale": backbone.layer_scale is not None,
        "patch_bias": backbone.patch_bias,
        "reg_tokens": backbone.reg_tokens,
        "global_pool": backbone.global_pool,
    }
    differences = [
        f"{name}: checkpoint {facts[name]}, model {value}"
        for name, value in expected.items()
        if name in facts and facts[name] != value
    ]
    if differences:
        raise ConversionError(
            f"The checkpoint does not fit --model {model_name}: " + "; ".join(differences) + ". "
            "Pick the timm name the checkpoint was trained with (see "
            "clca_jax.models.list_backbones()), or set the size overrides "
            "(--embed_dim/--depth/--num_heads) for a non-standard size."
        )


# ---------------------------------------------------------------------------------------------
# timm -> Flax


# Flax head modules -> the reference's `ifa_head` Sequential indices.
_HEAD_MODULES = {
    "cla_head": {
        "norm_in": "ifa_head.0.0",
        "depthwise": "ifa_head.0.1",
        "norm_mid": "ifa_head.0.2",
        "classifier": "ifa_head.0.4",
    },
    "ifa_head": {
        "layer_weights": "ifa_head.0.0",
        "norm": "ifa_head.0.3",
        "classifier": "ifa_head.0.4",
    },
}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}


def flax_to_timm_key(path: tuple[str, ...], method: type[Method] = NoReduction) -> str:
    """The reference (timm-style) key of a Flax leaf.

    ('blocks_3', 'attn', 'qkv', 'kernel') -> 'blocks.3.attn.qkv.weight';
    ('cla_head', 'depthwise', 'kernel') -> 'ifa_head.0.1.weight';
    ('reduction_1', 'predictor', 'fc1', 'bias') -> 'score_predictor.1.out_conv.0.bias' (the
    reduction method's own names: `Method.checkpoint_key`).
    """
    *modules, leaf = path
    if modules and modules[0].startswith("reduction_"):
        stage, inner = modules[0].removeprefix("reduction_"), tuple(modules[1:])
        # A parameter of the method's module itself keeps its name (SiT's `scale`).
        return method.checkpoint_key(stage, inner, _LEAF_NAMES.get(leaf, leaf) if inner else leaf)
    leaf = _LEAF_NAMES.get(leaf, leaf)
    if modules and modules[0] in _HEAD_MODULES:
        return f"{_HEAD_MODULES[modules[0]][modules[1]]}.{leaf}"
    name = ".".join(modules + [leaf])
    return re.sub(r"(^|\.)([A-Za-z_]+?)_(\d+)(?=\.)", r"\1\2.\3", name)


def to_flax_layout(key: str, value: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
    """PyTorch weight layout -> Flax kernel layout.

    Linear [out, in] -> [in, out]; Conv2d OIHW -> HWIO; Conv1d [out, in/groups, k] -> [k, in/groups,
    out]; a 1x1 Conv1d used as a Linear [out, in, 1] -> [in, out].
    """
    if not key.endswith(".weight") or len(flax_shape) == 1:
        return value
    if value.ndim == 2:
        return value.T
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 3 and len(flax_shape) == 2:
        return value[:, :, 0].T
    if value.ndim == 3:
        return value.transpose(2, 1, 0)
    return value


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(entry, "key", entry)) for entry in path)


def convert_state_dict(
    state: Mapping[str, np.ndarray],
    model_config: ml_collections.ConfigDict,
    *,
    antialias: bool = True,
    seed: int = 0,
) -> tuple[dict, Report]:
    """Converts a timm-format (or OpenCLIP) state dict into the model's Flax variables.

    Args:
      state: the checkpoint tensors, PyTorch layout.
      model_config: the target `model` config (backbone, img_size, num_classes, ...).
      antialias: position-embedding resampling route; timm-format weights use the antialiased
        kernel, the OpenCLIP route the non-antialiased one (spec 1.3). Ignored for OpenCLIP
        input, which always uses the non-antialiased kernel.
      seed: seed of the fresh parameters (new head, CLR position rows).

    Returns:
      (variables, report).

    Raises:
      ConversionError: a key is missing, unknown or of the wrong shape, or the checkpoint is of
        another architecture.
    """
    report = Report()
    if is_openclip(state):
        state = openclip_to_timm(state, report)
        antialias = False
    model = create_model(model_config)
    check_architecture(state, model.backbone, model_config.backbone)
    check_cla_kernels(state, model)
    dummy = model.example_images()
    converter = _Converter(
        model=model,
        stored_clr=state["clr"].shape[1] if "clr" in state else 0,
        remaining=dict(state),
        antialias=antialias,
        rng=np.random.default_rng(seed),
        report=report,
        initialise=functools.cache(lambda: jax.jit(model.init)(jax.random.key(seed), dummy)),
    )
    leaves = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(model.abstract_variables())[0]:
        names = _path_names(path)
        leaves[names] = converter.take(flax_to_timm_key(names[1:], model.method), names, leaf)
    for key in sorted(converter.remaining):
        why = _unused_reason(key, model_config)
        if why is None:
            raise ConversionError(
                f"Checkpoint key {key!r} (shape {tuple(converter.remaining[key].shape)}) has no "
                f"place in the model ({model_config.backbone}, reduction "
                f"{model_config.reduction.method!r}, head {model_config.clca.head!r}); is the "
                "configuration right for this checkpoint?"
            )
        report.drop(key, why)
    return _unflatten(leaves), report


def check_cla_kernels(state: dict, model: VisionTransformer) -> None:
    """Refuses a CLA head checkpoint whose depthwise kernels per channel differ from the
    config's (the reference's `--ifa_dws_conv_groups`)."""
    key = "ifa_head.0.1.weight"  # the depthwise convolution, [kernels * D, 1, depths]
    if model.clca.head != "cla" or key not in state:
        return
    stored = state[key].shape[0] / model.backbone.embed_dim
    wanted = model.clca.kernels_per_channel
    if stored != wanted:
        raise ConversionError(
            f"The checkpoint's CLA head has {stored:g} kernels per channel ({key} of shape "
            f"{tuple(state[key].shape)}) but model.clca.kernels_per_channel is {wanted}; set "
            f"model.clca.kernels_per_channel={stored:g}."
        )


def _unused_reason(key: str, model_config: ml_collections.ConfigDict) -> str | None:
    """Why a checkpoint key is deliberately left out, or None when it is unexpected."""
    if key.startswith(("head.", "fc_norm.")) and model_config.clca.head != NO_HEAD:
        return "the reference's unused classifier (the CLA/IFA head classifies)"
    if key.endswith("num_batches_tracked"):
        return "BatchNorm step counter (not needed)"
    return None


@dataclasses.dataclass
class _Converter:
    """Takes model leaves one by one out of `remaining` (the checkpoint keys not yet used)."""

    model: VisionTransformer
    stored_clr: int
    remaining: dict[str, np.ndarray]
    antialias: bool
    rng: np.random.Generator
    report: Report
    initialise: Callable[[], dict]  # the model's own initial variables (computed on demand)
    cls_token: np.ndarray | None = None

    def initial(self, names: tuple[str, ...]) -> np.ndarray:
        node = self.initialise()
        for name in names:
            node = node[name]
        return np.asarray(node)

    def _cls_token(self) -> np.ndarray:
        if self.cls_token is None:
            self.cls_token = self.remaining["cls_token"]
        return self.cls_token

    def _clr(self, key: str, init_value) -> np.ndarray:
        """CLR tokens of a CLCA checkpoint; a different count is re-created from CLS."""
        value = self.remaining.pop(key)
        if value.shape == init_value.shape:
            self.report.copied.append(key)
            return value
        self.report.drop(key, f"{value.shape[1]} CLR tokens, the model has {init_value.shape[1]}")
        self.report.fresh[key] = "CLR tokens initialised as copies of the class token"
        return clr_from_class_token(self._cls_token(), init_value.shape[1])

    def take(self, key: str, names: tuple[str, ...], init_value) -> np.ndarray:
        """The checkpoint value for one model leaf (mapped, resampled or fresh).

        Args:
          key: the leaf's checkpoint key.
          names: the leaf's path in the Flax variables (collection first).
          init_value: the leaf's abstract value (shape and dtype).
        """
        expected = tuple(init_value.shape)
        if key.startswith(("head.", "ifa_head.0.4.")):
            return self._head(key, names, init_value)
        if key == "clr" and key in self.remaining:
            return self._clr(key, init_value)
        if key == "clr":
            self.report.fresh[key] = "CLR tokens initialised as copies of the class token"
            return clr_from_class_token(self._cls_token(), expected[1])
        if key not in self.remaining:
            raise ConversionError(
                f"Checkpoint has no {key!r} (shape {expected}), which the model needs."
            )
        value = to_flax_layout(key, self.remaining.pop(key), expected)
        self.report.copied.append(key)
        if key == "cls_token":
            self.cls_token = value
        if key == "pos_embed":
            value = self._pos_embed(value, expected)
        if tuple(value.shape) != expected:
            raise ConversionError(
                f"Checkpoint key {key!r} has shape {tuple(value.shape)} (in Flax layout) but "
                f"the model expects {expected}; is --model right for this checkpoint?"
            )
        return value

    def _head(self, key: str, names: tuple[str, ...], init_value) -> np.ndarray:
        value = self.remaining.get(key)
        classes = init_value.shape[-1]
        if value is not None:
            stored = to_flax_layout(key, value, tuple(init_value.shape))
            del self.remaining[key]
            if stored.shape == init_value.shape:
                self.report.copied.append(key)
                return stored
            self.report.drop(key, f"{value.shape[0]}-class head, the model has {classes} classes")
        self.report.fresh[key] = f"new head for {classes} classes"
        return self.initial(names)

    def _pos_embed(self, value: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
        """The checkpoint's embedding on the model's grid, with the model's CLR rows."""
        no_embed_class = self.model.backbone.no_embed_class
        num_prefix = 0 if no_embed_class else self.model.backbone.num_prefix_tokens
        try:
            adapted, how = adapt_pos_embed(
                value,
                grid=self.model.grid,
                num_prefix=num_prefix,
                source_clr=0 if no_embed_class else self.stored_clr,
                target_clr=expected[1] - num_prefix - self.model.num_patches,
                antialias=self.antialias,
                rng=self.rng,
            )
        except ValueError as error:
            raise ConversionError(f"{error} Is --model right?") from error
        if how:
            self.report.adapted["pos_embed"] = "; ".join(how)
        return adapted


def _unflatten(flat: dict[tuple[str, ...], np.ndarray]) -> dict:
    tree: dict = {}
    for names, value in flat.items():
        node = tree
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = np.asarray(value, dtype=np.float32)
    return tree
