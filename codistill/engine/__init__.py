"""Running peers: the one training loop, the local and Ray runners, checkpoints."""
