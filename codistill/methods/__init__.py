"""Method registry. A method is plain PyTorch: it declares what it needs (`Needs`), and turns
the signals the engine serves (`Signals`) into a loss. Methods know nothing of Ray or of how
peers' and teachers' outputs arrive."""

from codistill.methods.base import (METHODS, DistillConfig, Method, MethodConfig, Needs, RoundSpec, Signals,
                                    create_method, register_method)
from codistill.methods import (at, codistill, crd, dml, fitnets, fsp, ft, independent, kd, kdcl,  # noqa: F401
                               logit_regression, okddip, one, overhaul, pcl)  # (registers)

__all__ = ["METHODS", "DistillConfig", "Method", "MethodConfig", "Needs", "RoundSpec", "Signals",
           "create_method", "register_method"]
