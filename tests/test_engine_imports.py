"""What the engine imports where: FSDP2, DTensor and DCP only where a sharded peer first needs
them (engine/sharding.py says why). That a sharded peer still finds them is every sharding test's
business (`sharding_policy` itself: tests/test_sharding.py's casting test)."""

import subprocess
import sys

import pytest

from tests.conftest import REPO, scaled


@pytest.mark.slow  # a fresh interpreter importing the engine and training a short run (~8 s)
def test_the_cli_imports_no_fsdp_dtensor_or_dcp_and_a_replicated_run_no_dcp(tmp_path):
    """The stack is imported where a sharded peer first needs it (engine/sharding.py): the CLI and
    the Ray runner's modules load none of it; a replicated peer's steps load torch's optimizer's
    own share (torch._dynamo imports FSDP2 and DTensor at the first step), never DCP."""
    probe = f"""
import sys
stack = ("torch.distributed.fsdp", "torch.distributed.tensor", "torch.distributed.checkpoint")
import codistill.cli, codistill.engine.ray.runner, codistill.engine.ray.workers
print(sorted(m for m in stack if m in sys.modules))
from codistill.engine.run import train
from tests.conftest import small_config
train(small_config({str(tmp_path)!r}, "name=plain", "train.steps=20", "train.eval_every=20", "train.checkpoint_every=10"), "local")
print("torch.distributed.checkpoint" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=scaled(300))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-2:] == ["[]", "False"]
