"""How peers see each other's predictions. Three transports, one interface."""

from codistill.exchange.base import Exchange
from codistill.exchange.local import LocalExchange

__all__ = ["Exchange", "LocalExchange"]
