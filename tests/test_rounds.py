"""How many of a peer's rounds a transport keeps: one rule (`keep_newest_rounds`) for the local
publications and the Ray round boards."""

import torch

from codistill.exchange import LocalPublications
from codistill.exchange.base import KEEP_ROUNDS, keep_newest_rounds


def test_the_newest_rounds_are_kept_and_no_more():
    rounds = {r: r for r in range(10)}
    keep_newest_rounds(rounds, 9, keep=3)
    assert sorted(rounds) == [7, 8, 9]
    rounds = {r: r for r in range(20)}
    keep_newest_rounds(rounds, 19)  # 0: the default
    assert sorted(rounds) == list(range(20 - KEEP_ROUNDS, 20))


def test_the_local_publications_keep_what_the_publisher_says_its_readers_can_use():
    exchange = LocalPublications(2).exchange_for(0)
    for r in range(6):
        exchange.publish(r, 0, {"logits": torch.full((1,), float(r))}, keep=2)
    assert exchange.newest(0, 0, None, timeout=0)[0] == 5
    assert exchange.newest(0, 0, 3, timeout=0) is None  # rounds 0..3 are gone: only 4 and 5 are kept
    assert exchange.newest(0, 4, 4, timeout=0)[0] == 4
