"""The installed packages' Python source as a corpus (`site_packages`, on a tiny stand-in folder,
never the real one), and `data.max_passes`: the critical-batch LM config refuses a run that
would see a window twice, the data-parallel arm's doubled batch and a tuning trial's four fifths
included."""

import sysconfig

import pytest

from codistill.config import ConfigError, data_parallel, load_config
from codistill.data import load_data, text
from codistill.engine.job import peer_schedules
from codistill.engine.run import train
from tests.conftest import small_config

LM_MAP = "configs/critical_batch_lm.yaml"


def _fake_site_packages(tmp_path, monkeypatch):
    """A site-packages folder of a few packages, where `sysconfig` says the environment's is."""
    site = tmp_path / "lib" / "site-packages"
    files = {
        "alpha/__init__.py": "from .core import run\n",
        "alpha/core.py": "def run(x):\n    return [i * x for i in range(10)]\n" * 20,
        "beta/_vendor/core.py": "def run(x):\n    return [i * x for i in range(10)]\n" * 20,  # vendored copy
        "beta/io.py": "import os\n\ndef read(path):\n    with open(path) as f:\n        return f.read()\n" * 15,
        "gamma.py": "".join(f"VALUE_{i} = {i * i}\n" for i in range(200)),
        "alpha/tests/test_core.py": "def test_run():\n    assert run(1)\n",  # a test suite: left out
        "__editable___mine_0_1_finder.py": "MAPPING = {'mine': '/home/me/mine'}\n",  # a path, not a package
        "alpha/README.txt": "not Python\n",
    }
    for name, body in files.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(body)
    paths = {**sysconfig.get_paths(), "purelib": str(site), "platlib": str(site)}
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: paths)
    return site


def test_site_packages_is_the_installed_python_source_without_tests_or_editable_finders(tmp_path, monkeypatch):
    site = _fake_site_packages(tmp_path, monkeypatch)
    root, files = text.site_packages_files()
    assert root == site
    assert [str(f.relative_to(site)) for f in files] == [
        "alpha/__init__.py", "alpha/core.py", "beta/_vendor/core.py", "beta/io.py", "gamma.py"]
    cfg = load_config(LM_MAP, [f"data.root={tmp_path / 'cache'}", "data.tokenizer=bytes", "data.context=16",
                               "data.test_windows=1000"])
    data = load_data(cfg.data)
    fingerprint = data.fingerprint
    assert fingerprint["files"] == 5 and fingerprint["duplicates"] == 1  # the vendored copy, left out
    assert fingerprint["corpus_sha256"] == text.corpus_hash(root, files) and fingerprint["split"] == "content"
    kept = sum(len(f.read_bytes()) for f in files) - len(files[2].read_bytes())
    assert fingerprint["train_tokens"] + fingerprint["test_tokens"] == kept + 4  # bytes, and an end-of-text each
    (site / "gamma.py").write_text("VALUE = 1\n")  # another version of a package is another corpus
    assert load_data(cfg.data).fingerprint["corpus_sha256"] != fingerprint["corpus_sha256"]


def test_the_lm_map_config_sees_no_window_twice_at_either_arm():
    cfg = load_config(LM_MAP)
    assert cfg.data.max_passes == 1 and cfg.data.name == "site_packages"
    fits = cfg.train.steps * cfg.data.batch_size * 2  # windows the data-parallel arm draws (batch 2b)
    peer_schedules(cfg, fits)
    dp = data_parallel(cfg)
    assert dp.data.batch_size == 2 * cfg.data.batch_size and dp.data.max_passes == 1
    peer_schedules(dp, fits)
    with pytest.raises(ConfigError, match=r"data.max_passes: is 1, but 1000 steps of batch 128 draw 128,000 "
                                          r"examples from the 127,999 .*1.00 passes.*train.steps to at most 999"):
        peer_schedules(dp, fits - 1)  # one window short: the peers would still fit, the one model not
    peer_schedules(cfg, fits - 1)
    sharded = load_config(LM_MAP, ["data.shard=true"])  # each peer its half
    with pytest.raises(ConfigError, match="data.max_passes"):
        peer_schedules(sharded, fits - 1)


def test_max_passes_refuses_a_run_before_it_trains_and_lets_one_that_fits(tmp_path):
    # 4,000 MNIST-1D examples, a fifth held out for validation: 3,200 to train on
    cfg = small_config(tmp_path, "method.name=independent", "data.batch_size=32", "data.validation=0.2",
                       "data.max_passes=1", "train.steps=101", "name=over")
    with pytest.raises(ConfigError, match="101 steps of batch 32 draw 3,232 examples from the 3,200"):
        train(cfg, backend="local")
    assert not list((tmp_path / "over").rglob("*.parquet"))  # nothing was trained or recorded
    fits = small_config(tmp_path, "method.name=independent", "data.batch_size=32", "data.validation=0.2",
                        "data.max_passes=1", "train.steps=100", "train.eval_every=100", "name=fits")
    assert train(fits, backend="local") is not None
    with pytest.raises(ConfigError, match="max_passes: must be >= 0"):
        small_config(tmp_path, "data.max_passes=-1")
