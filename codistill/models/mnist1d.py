"""The MNIST-1D paper's models (Greydanus 2020): a 3-layer 1-D CNN and a 2-hidden-layer MLP,
plus a wide and a narrow CNN as the teacher and student of the distillation examples."""

from torch import nn

from codistill.models.registry import PeerModel, register_model

# Each conv block's output after its ReLU, and before it (`.pre`, what FSP/AT variants and the
# overhaul use); `penultimate`: the flattened feature vector the classifier reads (CRD's embedding).
CNN_TAPS = {"conv1": "features.1", "conv2": "features.3", "conv3": "features.5",
            "conv1.pre": "features.0", "conv2.pre": "features.2", "conv3.pre": "features.4",
            "penultimate": "features"}
MLP_TAPS = {"hidden1": "features.2", "hidden2": "features.4", "hidden1.pre": "features.1",
            "hidden2.pre": "features.3", "penultimate": "features"}


def _cnn(num_classes: int, channels: int) -> PeerModel:
    # Length 40 → 19 → 10 → 5 with these strides; the paper's ConvBase.
    features = nn.Sequential(
        nn.Conv1d(1, channels, 5, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
    )
    return PeerModel(features, channels * 5, num_classes)


# ONE's trunk: the first two conv layers; each branch gets the third and the classifier.
@register_model("mnist1d_cnn", input_kind="sequence", branch_point=4, taps=CNN_TAPS)
def mnist1d_cnn(num_classes: int) -> PeerModel:
    """The MNIST-1D paper's CNN: three strided conv layers of 25 channels (~94% published)."""
    return _cnn(num_classes, channels=25)


@register_model("mnist1d_cnn_wide", input_kind="sequence", branch_point=4, taps=CNN_TAPS)
def mnist1d_cnn_wide(num_classes: int) -> PeerModel:
    """64 channels (8× the narrow one's weights per layer): the teacher of the MNIST-1D examples."""
    return _cnn(num_classes, channels=64)


@register_model("mnist1d_cnn_narrow", input_kind="sequence", branch_point=4, taps=CNN_TAPS)
def mnist1d_cnn_narrow(num_classes: int) -> PeerModel:
    """8 channels: a student with a third of the paper CNN's width."""
    return _cnn(num_classes, channels=8)


@register_model("mnist1d_mlp", input_kind="sequence", branch_point=3, taps=MLP_TAPS)
def mnist1d_mlp(num_classes: int, hidden: int = 100) -> PeerModel:
    """The MNIST-1D paper's MLP: two hidden layers of 100 units (~68% published)."""
    features = nn.Sequential(nn.Flatten(), nn.Linear(40, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
    return PeerModel(features, hidden, num_classes)
