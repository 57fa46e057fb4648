"""torchvision's ImageNet architectures as peers (random init; no weights are downloaded).

The network's own last linear layer is replaced by the identity so the model fits
`PeerModel`'s features + classifier split."""

from torch import nn

from codistill.models.registry import PeerModel, register_model

TORCHVISION_MODELS = ("resnet18", "resnet50", "mobilenet_v2", "shufflenet_v2_x1_0", "efficientnet_b0")


def torchvision_peer(arch: str, num_classes: int) -> PeerModel:
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None)
    parent, attr, last = None, None, None
    for module in net.modules():  # find the final nn.Linear and the module holding it
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                parent, attr, last = module, name, child
    setattr(parent, attr, nn.Identity())
    return PeerModel(net, last.in_features, num_classes)


for _arch in TORCHVISION_MODELS:
    _build = lambda num_classes, a=_arch: torchvision_peer(a, num_classes)  # noqa: E731
    _build.__doc__ = f"torchvision's {_arch}, untrained, its last linear layer replaced by the peer's classifier."
    register_model(f"tv_{_arch}", input_kind="image")(_build)
