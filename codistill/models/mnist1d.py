"""The MNIST-1D paper's models (Greydanus 2020): a 3-layer 1-D CNN and a 2-hidden-layer MLP."""

from torch import nn

from codistill.models.registry import PeerModel, register_model


# ONE's trunk: the first two conv layers; each branch gets the third and the classifier.
@register_model("mnist1d_cnn", input_kind="sequence", branch_point=4)
def mnist1d_cnn(num_classes: int, channels: int = 25) -> PeerModel:
    # Length 40 → 19 → 10 → 5 with these strides; the paper's ConvBase.
    features = nn.Sequential(
        nn.Conv1d(1, channels, 5, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
    )
    return PeerModel(features, channels * 5, num_classes)


@register_model("mnist1d_mlp", input_kind="sequence", branch_point=3)
def mnist1d_mlp(num_classes: int, hidden: int = 100) -> PeerModel:
    features = nn.Sequential(nn.Flatten(), nn.Linear(40, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
    return PeerModel(features, hidden, num_classes)
