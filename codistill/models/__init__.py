"""Model registry: `create_model(name, num_classes, **model_args)` is the one front door."""

from codistill.models.registry import MODELS, PeerModel, create_model, register_model
from codistill.models import gpt, hf, mnist1d, resnet_cifar, torchvision_adapter  # noqa: F401  (registers)

__all__ = ["MODELS", "PeerModel", "create_model", "register_model"]
