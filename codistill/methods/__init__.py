"""Method registry. A method is plain PyTorch: own logits and the peers' (detached) logits in,
a loss out. Methods know nothing of Ray or of how peers' predictions arrive."""

from codistill.methods.base import METHODS, DistillConfig, Method, MethodConfig, create_method, register_method
from codistill.methods import codistill, dml, independent, one  # noqa: F401  (registers)

__all__ = ["METHODS", "DistillConfig", "Method", "MethodConfig", "create_method", "register_method"]
