"""Runs over runs: `compare` (methods × seeds, paired, tuned alike), `tune` (a Ray Tune sweep,
each trial a peer group) and `born_again` (generations, each taught by the one before). Each
is built on `engine.run.train`; none is needed to train one run."""
