"""How peers see each other: every step (`Exchange`) or per round (`PeriodicExchange`), each
through a local, a collective or an object-store transport (see `base.py`)."""

from codistill.exchange.base import Exchange, Payload, PeriodicExchange
from codistill.exchange.local import LocalExchange, LocalGatherHub, LocalPeriodicExchange, LocalPublications

__all__ = ["Exchange", "LocalExchange", "LocalGatherHub", "LocalPeriodicExchange", "LocalPublications", "Payload",
           "PeriodicExchange"]
