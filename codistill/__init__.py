"""codistill: distributed online distillation (DML, codistillation, ONE) on Ray and PyTorch."""

__version__ = "0.1.0"
