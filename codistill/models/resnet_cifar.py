"""CIFAR ResNets (He et al. 2016, section 4.2): 6n+2 layers, stages of 16/32/64 channels.

Shortcuts that change shape use a 1×1 convolution with batch norm (option B), as the DML and
ONE reference code do."""

from torch import nn

from codistill.models.registry import PeerModel, register_model


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))
        # No parameters: a named point where the sum before the ReLU can be tapped (`stage3.pre`).
        self.preact = nn.Identity()

    def forward(self, x):
        return self.preact(self.body(x) + self.shortcut(x)).relu()


def resnet_stage(in_channels: int, channels: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_channels, channels, stride)]
    layers += [BasicBlock(channels, channels, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def resnet_stem() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))


def cifar_resnet(depth: int, num_classes: int) -> PeerModel:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    features = nn.Sequential(
        resnet_stem(),
        resnet_stage(16, 16, n, 1), resnet_stage(16, 32, n, 2), resnet_stage(32, 64, n, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    model = PeerModel(features, 64, num_classes)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def resnet_taps(depth: int) -> dict[str, str]:
    """The stem's output, each stage's output (after its last block's ReLU), each stage's
    pre-activation sum (`.pre`) and the pooled feature vector the classifier reads (`penultimate`)."""
    last = (depth - 2) // 6 - 1
    taps = {"stem": "features.0"}
    taps.update({f"stage{s}": f"features.{s}" for s in (1, 2, 3)})
    taps.update({f"stage{s}.pre": f"features.{s}.{last}.preact" for s in (1, 2, 3)})
    taps["penultimate"] = "features"
    return taps


def resnet_norms(depth: int) -> dict[str, str]:
    """Each `.pre` tap's batch norm: the last BN of its block's residual branch (the overhaul's
    margin reads it, as the authors' `get_bn_before_relu` reads `bn2` of each stage's last block)."""
    last = (depth - 2) // 6 - 1
    return {f"stage{s}.pre": f"features.{s}.{last}.body.4" for s in (1, 2, 3)}


# ONE's trunk: stem + stages 1 and 2 (features[:3]); each branch gets stage 3 and the classifier.
for _depth in (20, 32, 56, 110):
    _build = lambda num_classes, d=_depth: cifar_resnet(d, num_classes)  # noqa: E731
    _build.__doc__ = f"The CIFAR ResNet-{_depth} (He et al., 2016): three stages of {(_depth - 2) // 6} basic blocks."
    register_model(f"resnet{_depth}", input_kind="image", branch_point=3, taps=resnet_taps(_depth),
                   norms=resnet_norms(_depth))(_build)
