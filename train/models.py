"""Models from timm (plus a small CNN registered with timm for digits and tests); local weights only."""
from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn
from timm.models import register_model

from .config import UserError

logger = logging.getLogger(__name__)


class FeaturesHead(nn.Module):
    """The timm model interface of the small models defined here: `features` -> global average pool (conv
    maps; an MLP's vector passes as it is) -> dropout -> `fc`, with forward_features / forward_head(pre_logits)
    / get_classifier / num_features as timm's models have them."""

    def __init__(self, features: nn.Module, num_features: int, num_classes: int, drop_rate: float):
        super().__init__()
        self.features = features
        self.num_features = num_features
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(num_features, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, x, pre_logits: bool = False):
        x = self.drop(x.mean((2, 3)) if x.ndim == 4 else x)
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def timm_kwargs(kwargs: dict) -> dict:
    """The model's own keyword arguments: what timm's create_model adds for pretrained weights dropped."""
    return {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}


class SmallCNN(FeaturesHead):
    """Three conv blocks + global pooling; for 8x8 digits and 32x32 CIFAR-sized smoke tests."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 32, drop_rate: float = 0.0, **_):
        c = [width, width * 2, width * 4]
        super().__init__(nn.Sequential(
            nn.Conv2d(in_chans, c[0], 3, padding=1, bias=False), nn.BatchNorm2d(c[0]), nn.ReLU(inplace=True),
            nn.Conv2d(c[0], c[1], 3, padding=1, bias=False), nn.BatchNorm2d(c[1]), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c[1], c[2], 3, padding=1, bias=False), nn.BatchNorm2d(c[2]), nn.ReLU(inplace=True),
        ), c[2], num_classes, drop_rate)


@register_model
def small_cnn(pretrained=False, **kwargs):
    """timm entry point of `SmallCNN` (no pretrained weights exist)."""
    return SmallCNN(**timm_kwargs(kwargs))


@register_model
def small_cnn_w16(pretrained=False, **kwargs):
    """`SmallCNN` at width 16 (~4x fewer multiply-adds than width 32): the Fashion-MNIST benchmark model."""
    return small_cnn(width=16, **kwargs)


class SmallMLP(FeaturesHead):
    """Average-pool the image to `pool` x `pool`, then two wide fully connected layers: an over-parameterised
    network (~1.3M weights at 28x28 grey) that memorises noisy labels within a few epochs on CPU, the regime in
    which the noisy-label methods are meant to work (a 23k-weight CNN underfits instead; docs/benchmarks.md)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, hidden: int = 1024, pool: int = 14,
                 drop_rate: float = 0.0, **_):
        super().__init__(nn.Sequential(
            nn.AdaptiveAvgPool2d(pool), nn.Flatten(),
            nn.Linear(in_chans * pool * pool, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        ), hidden, num_classes, drop_rate)


@register_model
def small_mlp(pretrained=False, **kwargs):
    """timm entry point of `SmallMLP` (no pretrained weights exist)."""
    return SmallMLP(**timm_kwargs(kwargs))


def _cifar_stem(model: nn.Module, in_chans: int) -> nn.Module:
    """Give a timm ResNet the CIFAR stem: 3x3 stride-1 conv, no max-pool (32x32 in -> 4x4 final map)."""
    model.conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    model.feature_info[0]["reduction"] = 1
    return model


@register_model
def cifar_resnet34(pretrained=False, **kwargs):
    """ResNet-34 with the CIFAR stem (the MixNN paper's CIFAR backbone; ~21.3M weights at 10 classes).
    timm's `resnet34` keeps the ImageNet stem (7x7 stride-2 conv + max-pool): a 1x1 final map on 32x32."""
    from timm.models.resnet import BasicBlock, ResNet
    kwargs = timm_kwargs(kwargs)
    return _cifar_stem(ResNet(BasicBlock, (3, 4, 6, 3), **kwargs), kwargs.get("in_chans", 3))


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice, identity (or 1x1 conv) shortcut taken after the first BN-ReLU (He et al. 2016)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        return self.conv2(torch.relu(self.bn2(out))) + shortcut


class PreActResNet18(FeaturesHead):
    """DivideMix's backbone (its authors' PreActResNet18: CIFAR stem, final BN-ReLU, 4x4 average pool)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0, **_):
        layers, cin = [nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)]
            cin = cout
        layers += [nn.BatchNorm2d(512), nn.ReLU(inplace=True)]
        super().__init__(nn.Sequential(*layers), 512, num_classes, drop_rate)


@register_model
def preact_resnet18(pretrained=False, **kwargs):
    """timm entry point of `PreActResNet18` (~11.2M weights at 10 classes; no pretrained weights exist)."""
    return PreActResNet18(**timm_kwargs(kwargs))


def read_weights(file: Path) -> dict:
    """A local weights file as a {name: tensor} dict (.safetensors, or .pth/.pt through weights_only; a
    checkpoint's `state_dict` / `model` entry); anything else is a UserError naming the file."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # not a weights file, a damaged one, or a pickle that weights_only refuses
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(f"--pretrained {file}: cannot be read as {'safetensors' if file.suffix == '.safetensors' else 'PyTorch'} "
                        f"weights ({type(e).__name__}: {first}); name a state dict saved with torch.save or "
                        "safetensors (pickled Python objects are never loaded)") from None
    if isinstance(state, dict):
        state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--pretrained {file}: holds no {{name: tensor}} state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_local_weights(model: nn.Module, path: str, strict: bool = True) -> None:
    """Load a local state dict into `model`. The classifier is re-initialised when its shape differs (e.g.
    ImageNet's 1000 classes -> 14); any other tensor that is missing, unexpected or of another shape is an
    error (`strict`), or is listed in the log and left as initialised (`strict=False`)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--pretrained {path}: file not found (weights are never downloaded; name a local "
                        ".pth/.pt/.safetensors file)")
    state = read_weights(file)
    own = model.state_dict()
    head = {f"{name}.{p}" for name, m in model.named_modules() if m is model.get_classifier()
            for p, _ in m.named_parameters(recurse=False)}
    wrong_shape = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state and k not in head]
    unexpected = [k for k in state if k not in own]
    problems = [k for k in wrong_shape if k not in head] + missing + unexpected
    if problems and strict:
        detail = "; ".join(f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} ({len(keys)})"
                           for what, keys in (("other shape", [k for k in wrong_shape if k not in head]),
                                              ("missing", missing), ("unexpected", unexpected)) if keys)
        raise UserError(f"--pretrained {path} does not fit {type(model).__name__} ({detail}); name weights of this "
                        "architecture, or pass --pretrained_strict false to load only the tensors that fit")
    for k in wrong_shape:
        del state[k]
    model.load_state_dict(state, strict=False)
    logger.info("loaded %s: %d tensors; re-initialised %s; not loaded: %s", path, len(state), wrong_shape,
                missing + unexpected)


def check_model_name(name: str) -> None:
    """A UserError (with close names) for a model timm does not know."""
    if timm.is_model(name):
        return
    import difflib

    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    raise UserError(f"--model {name!r}: unknown model" + (f" (did you mean {', '.join(close)}?)" if close else
                    "; timm.list_models() lists the names"))


def create_model(name: str, num_classes: int, in_chans: int, *, pretrained: str = "", drop_rate: float = 0.0,
                 pretrained_strict: bool = True):
    """A timm model with random init (never downloads), then optional local weights."""
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                              drop_rate=drop_rate)
    if pretrained and pretrained != "none":  # "none": from scratch on purpose (a config may require a choice)
        load_local_weights(model, pretrained, strict=pretrained_strict)
    return model


def channels_last(model: nn.Module, enabled: bool = True) -> nn.Module:
    """The model with its conv weights stored NHWC when `enabled` (timm's `--channels-last`); convolutions then
    run NHWC whatever the input layout. On this CPU (oneDNN) it made resnet10t's training step ~15% and its
    eval-mode forward ~30% faster; on GPUs with bf16 it is the usual choice."""
    return model.to(memory_format=torch.channels_last) if enabled else model


def embed_and_classify(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate-layer embeddings [b, d], logits [b, C]) of an eval-mode timm model."""
    features = model.forward_head(model.forward_features(images), pre_logits=True)
    return features, model.get_classifier()(features)
