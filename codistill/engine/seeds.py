"""Every random stream a run draws from, named by what it is for, so that none is drawn twice:
peer k initialises from `init_seed(seed, k)`; a teacher stage's own modules (`engine/stages.py`)
from the index no peer takes, and draw their batch order from a seed of their own. (The peers'
batch order is `data/schedule.py`'s; a method's per-step randomness, `methods/base.py`'s.)"""

STAGE_INDEX = 999


def init_seed(seed: int, index: int) -> int:
    """The initialisation seed of peer `index` (0..998) of a run with `seed`, or of its teacher
    stage (`STAGE_INDEX`)."""
    return seed * 1000 + index


def stage_order_seed(seed: int) -> int:
    """The seed of a teacher stage's batch order: not the peers' (it must not consume theirs)."""
    return seed * 7919 + 13
