import pickle
import threading

import numpy as np
import pytest
import torch

from codistill.config import ConfigError, load_config
from codistill.data import DATASETS, BatchSchedule, load_dataset


def test_schedule_is_a_function_of_seed_and_step():
    a, b = BatchSchedule(1000, 32, seed=3), BatchSchedule(1000, 32, seed=3)
    for step in [0, 5, 31, 32, 100, 7]:  # out of order, across epochs
        assert torch.equal(a.indices(step), b.indices(step))
    assert not torch.equal(a.indices(0), BatchSchedule(1000, 32, seed=4).indices(0))
    assert not torch.equal(a.indices(0), a.indices(a.steps_per_epoch))  # reshuffled each epoch


def test_one_schedule_shared_by_threads_gives_each_the_right_batch():
    # The local runner's peers share one schedule; a codistillation teacher reads the batches of
    # coming steps (maybe the next epoch) while another peer trains on the current epoch.
    shared, reference = BatchSchedule(1000, 10, seed=5), BatchSchedule(1000, 10, seed=5)
    expected = {step: reference.indices(step) for step in range(300)}
    wrong = []

    def read(steps):
        for _ in range(100):
            wrong.extend(step for step in steps if not torch.equal(shared.indices(step), expected[step]))

    threads = [threading.Thread(target=read, args=(range(start, 300, 97),)) for start in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_an_epoch_visits_each_example_at_most_once():
    s = BatchSchedule(100, 30, seed=0)
    seen = torch.cat([s.indices(i) for i in range(s.steps_per_epoch)])
    assert len(seen) == 90 and len(set(seen.tolist())) == 90


def test_shards_are_disjoint_and_cover_the_training_set():
    n, k = 1000, 4
    shards = [BatchSchedule(n, 10, seed=1, shard=i, num_shards=k) for i in range(k)]
    pools = [set(s.pool.tolist()) for s in shards]
    for i in range(k):
        for j in range(i + 1, k):
            assert not pools[i] & pools[j]
    assert set().union(*pools) == set(range(n))
    for s, pool in zip(shards, pools):  # each peer's batches come from its own shard
        assert set(torch.cat([s.indices(t) for t in range(30)]).tolist()) <= pool


def test_mnist1d_is_generated_locally_with_the_published_sizes(tmp_path):
    data = load_dataset("mnist1d", root=str(tmp_path))
    assert data.x_train.shape == (4000, 1, 40) and data.x_test.shape == (1000, 1, 40)
    assert sorted(data.y_train.unique().tolist()) == list(range(10))
    again = load_dataset("mnist1d", root=str(tmp_path))  # from the cache, identical
    assert torch.equal(again.x_train, data.x_train)


def _write_cifar(root, num_classes: int, train: int = 20, test: int = 10):
    """A tiny data set in torchvision's on-disk CIFAR format (pickled dicts of uint8 rows)."""
    rng = np.random.default_rng(0)
    label_key = "labels" if num_classes == 10 else "fine_labels"
    if num_classes == 10:
        folder, train_files, test_files, meta = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], ("batches.meta", "label_names")
    else:
        folder, train_files, test_files, meta = "cifar-100-python", ["train"], ["test"], ("meta", "fine_label_names")
    (root / folder).mkdir(parents=True)

    def batch(n):
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: rng.integers(0, num_classes, n).tolist()}

    for name in train_files:
        with open(root / folder / name, "wb") as f:
            pickle.dump(batch(train // len(train_files)), f)
    for name in test_files:
        with open(root / folder / name, "wb") as f:
            pickle.dump(batch(test), f)
    with open(root / folder / meta[0], "wb") as f:
        pickle.dump({meta[1]: [f"class{i}" for i in range(num_classes)]}, f)


def _trust_tiny_cifar(monkeypatch, root, classes: int) -> None:
    """Make torchvision's expected checksums those of the tiny files `_write_cifar` wrote."""
    import hashlib

    import torchvision

    base = torchvision.datasets.CIFAR10 if classes == 10 else torchvision.datasets.CIFAR100
    folder = root / base.base_folder

    def md5(name):
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    monkeypatch.setattr(base, "train_list", [[n, md5(n)] for n, _ in base.train_list])
    monkeypatch.setattr(base, "test_list", [[n, md5(n)] for n, _ in base.test_list])
    monkeypatch.setattr(base, "meta", {**base.meta, "md5": md5(base.meta["filename"])})


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_loader_reads_torchvisions_on_disk_format(tmp_path, monkeypatch, name, classes):
    _write_cifar(tmp_path, classes)
    _trust_tiny_cifar(monkeypatch, tmp_path, classes)
    data = load_dataset(name, root=str(tmp_path))
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_train.dtype == torch.uint8
    assert data.x_test.shape == (10, 3, 32, 32) and data.num_classes == classes
    x, y = data.train_batch(torch.arange(8), torch.Generator().manual_seed(0))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (8,)
    # The augmentation is a function of the generator: same seed, same crops and flips.
    x2, _ = data.train_batch(torch.arange(8), torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    x3, _ = data.train_batch(torch.arange(8), torch.Generator().manual_seed(1))
    assert not torch.equal(x, x3)


class Planted:
    """A pickle that would run code when loaded (it touches a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_cifar_files_that_fail_the_checksum_are_never_unpickled(tmp_path, monkeypatch):
    import codistill.data.checksums as checksums
    from codistill.errors import ConfigError

    _write_cifar(tmp_path, 10)
    _trust_tiny_cifar(monkeypatch, tmp_path, 10)
    load_dataset("cifar10", root=str(tmp_path))  # verified once...
    hashed = []
    monkeypatch.setattr(checksums, "_md5", lambda path: hashed.append(path) or "x")
    load_dataset("cifar10", root=str(tmp_path))
    assert hashed == []  # ...then remembered by size and modification time
    monkeypatch.undo()
    _trust_tiny_cifar(monkeypatch, tmp_path, 10)
    marker = tmp_path / "pwned"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump(Planted(str(marker)), f)  # a planted file on a shared data cache
    with pytest.raises(ConfigError) as info:
        load_dataset("cifar10", root=str(tmp_path))
    assert info.value.path == "data.root" and "checksum" in info.value.message and "data_batch_1" in info.value.message
    assert not marker.exists()


def test_missing_cifar_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.download=true"):
        load_dataset("cifar10", root=str(tmp_path))


def test_crop_and_flip_keep_the_pixels_of_the_image():
    data = DATASETS["synthetic_images"].load(root=None, augment=True, download=False)
    x, _ = data.train_batch(torch.arange(4), torch.Generator().manual_seed(0))
    plain = data._prepare(data.x_train[:4])
    # Every augmented row is a (shifted, maybe mirrored) window of the padded original.
    centre_plain = plain[:, :, 8:24, 8:24].flatten(1)
    centre_aug = x[:, :, 8:24, 8:24].flatten(1)
    for a, p in zip(centre_aug, centre_plain):
        assert torch.isin(a, p).float().mean() > 0.9


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_registered_data_set_takes_only_models_of_its_input_kind(name, tmp_path):
    kind = DATASETS[name].input_kind
    fits, misfit = {"image": ("resnet20", "mnist1d_cnn"), "sequence": ("mnist1d_cnn", "resnet20"),
                    "tokens": ("gpt", "mnist1d_cnn")}[kind]
    (tmp_path / "a.txt").write_text("some text\n")
    path = {"path": str(tmp_path)} if name in ("text", "hf_text") else {}  # the corpora of files need one
    config = {"method": {"name": "independent"}, "data": {"name": name, **path}}
    assert load_config({**config, "peers": [{"model": fits}]}).data.name == name
    with pytest.raises(ConfigError) as info:
        load_config({**config, "peers": [{"model": misfit}]})
    assert info.value.path == "peers.0.model" and kind in info.value.message


@pytest.mark.slow  # over ~1.5 s: the full tier (make test)
def test_a_larger_mnist1d_test_set_comes_from_the_same_generator_and_leaves_training_alone(tmp_path):
    default = load_dataset("mnist1d", root=str(tmp_path))
    larger = load_dataset("mnist1d", root=str(tmp_path), test_examples=2000)
    assert torch.equal(default.x_train, larger.x_train) and torch.equal(default.y_train, larger.y_train)
    assert larger.x_test.shape == (2000, 1, 40) and larger.y_test.bincount().tolist() == [200] * 10
    assert abs(float(larger.x_test.mean())) < 0.05 and abs(float(larger.x_test.std()) - 1) < 0.05  # standardised alike
    train_rows = {tuple(x.flatten().tolist()) for x in default.x_train}
    assert not any(tuple(x.flatten().tolist()) in train_rows for x in larger.x_test)  # another noise seed
    again = load_dataset("mnist1d", root=str(tmp_path), test_examples=2000)
    assert torch.equal(again.x_test, larger.x_test)


@pytest.mark.slow  # over ~1.5 s: the full tier (make test)
def test_a_generated_mnist1d_training_set_of_the_size_asked_trains_and_leaves_the_test_set_alone(tmp_path):
    default = load_dataset("mnist1d", root=str(tmp_path))
    larger = load_dataset("mnist1d", root=str(tmp_path), train_examples=6000)
    assert torch.equal(default.x_test, larger.x_test) and torch.equal(default.y_test, larger.y_test)
    assert larger.x_train.shape == (6000, 1, 40) and larger.y_train.bincount().tolist() == [600] * 10
    assert abs(float(larger.x_train.mean())) < 0.05 and abs(float(larger.x_train.std()) - 1) < 0.05  # standardised alike
    test_rows = {tuple(x.flatten().tolist()) for x in default.x_test}
    assert not any(tuple(x.flatten().tolist()) in test_rows for x in larger.x_train)  # another noise seed
    # A batch the default 4,000 cannot give each of two shards is fine with 6,000 generated.
    config = {"method": {"name": "dml"}, "peers": [{"model": "mnist1d_cnn"}] * 2,
              "data": {"name": "mnist1d", "shard": True, "batch_size": 2500, "root": str(tmp_path)}}
    with pytest.raises(ConfigError, match="data.batch_size: 2500 is more than the 2000 examples"):
        load_config(config)
    assert load_config({**config, "data": {**config["data"], "train_examples": 6000}}).data.train_examples == 6000


@pytest.mark.slow
def test_a_training_set_above_the_chunk_size_is_generated_in_chunks_the_first_of_them_the_smaller_set(
        tmp_path, monkeypatch):
    from codistill.data import loaders

    monkeypatch.setattr(loaders, "GENERATION_CHUNK", 300)
    one_call = load_dataset("mnist1d", root=str(tmp_path), train_examples=300)  # up to the chunk: one call, as before
    chunked = load_dataset("mnist1d", root=str(tmp_path), train_examples=700)  # chunks of 300, 300 and 100
    assert chunked.x_train.shape == (700, 1, 40) and chunked.x_train.dtype == torch.float32
    assert torch.equal(chunked.x_train[:300], one_call.x_train) and torch.equal(chunked.y_train[:300], one_call.y_train)
    second = loaders._make_dataset(seed=loaders.MNIST1D_TRAIN_SEED + 1, num_samples=300, train_split=1.0)
    assert torch.equal(chunked.x_train[300:600, 0], torch.from_numpy(second["x"]).float())  # chunk i: seed + i
    assert not torch.equal(chunked.x_train[300:600], chunked.x_train[:300])
    assert sorted(p.name for p in tmp_path.glob("mnist1d_train700_*")) == ["mnist1d_train700_seed2000042_chunks300.npz"]


@pytest.mark.parametrize("key", ["test_examples", "train_examples"])
def test_a_split_size_for_a_data_set_with_fixed_splits_is_one_line_naming_the_key(key):
    with pytest.raises(ConfigError) as info:
        load_config({"method": "dml", "peers": [{"model": "resnet20"}] * 2,
                     "data": {"name": "cifar10", key: 10000}})
    assert info.value.path == f"data.{key}" and "mnist1d" in info.value.message


# -- text: split by content, duplicates dropped, the tokenizer's sample bounded --------------------

def _corpus_with_copies(folder, copies=40, distinct=30):
    """A folder like one that bit a user: `copies` symlinks to one README, and distinct files."""
    folder.mkdir()
    readme = folder / "README.txt"
    readme.write_text("MARKER-README-MARKER one text many names\n" + "the same words again and again\n" * 20)
    for i in range(copies - 1):
        (folder / f"copy_{i:02d}.txt").symlink_to(readme)
    for i in range(distinct):
        (folder / f"z_{i:02d}.txt").write_text(f"document {i}: " + " ".join(f"word{i * j % 97}" for j in range(80)) + "\n")
    return folder


@pytest.mark.parametrize("name", [n for n, e in DATASETS.items() if e.input_kind == "tokens"])
def test_every_text_source_splits_by_content_with_copies_left_out_and_counted(name, tmp_path, monkeypatch, caplog):
    from codistill.data import load_data, text

    folder = _corpus_with_copies(tmp_path / "corpus")
    for source in ("stdlib_files", "site_packages_files"):  # the Python-source corpora, in small
        monkeypatch.setattr(text, source, lambda: text.text_files(str(folder)))
    hf = name == "hf_text"  # read by `datasets`: a BPE with an end-of-text token (not bytes)
    settings = load_config("configs/codistill_lm_stdlib.yaml", [
        f"data.name={name}", *([f"data.path={folder}"] if name in ("text", "hf_text") else []),
        f"data.root={tmp_path / 'cache'}", "data.tokenizer=bpe" if hf else "data.tokenizer=bytes", "data.vocab_size=300",
        "data.context=16", "data.test_windows=100000"]).data
    data = load_data(settings)
    assert data.fingerprint["duplicates"] == 39 and data.fingerprint["split"] == "content"
    assert "39 of 70 documents are exact copies" in caplog.text  # said, not silent
    if hf:
        from transformers import AutoTokenizer

        decode = AutoTokenizer.from_pretrained(data.tokenizer).decode
        streams = [decode(x.flatten().tolist()).encode() for x in (data.x_train, data.x_test)]
    else:
        streams = [bytes(i for i in x.flatten().tolist() if i < 256) for x in (data.x_train, data.x_test)]  # 256: end
    assert sum(s.count(b"MARKER-README-MARKER") for s in streams) == 1  # once, on one side (by path: 36 + 4)
    assert all(streams)


def test_identical_documents_land_on_one_side_whatever_their_names_and_the_cache_knows_the_rule(tmp_path, monkeypatch):
    from codistill.data import text

    docs = [f"document number {i}\n" * 5 for i in range(200)]
    train, test, dropped = text.split_documents(docs + docs[:50] + docs[::-1])
    assert dropped == 250 and sorted(train + test) == sorted(docs) and not set(train) & set(test)
    assert 10 <= len(test) <= 30  # one in ten
    assert text.split_documents(docs[::-1])[1] == text.split_documents(docs)[1][::-1]  # by content, not place
    root, files = text.text_files(str(_corpus_with_copies(tmp_path / "corpus", copies=2, distinct=20)))
    text.build_corpus(root, files, tmp_path / "cache", "bytes", 256, 16, 4)
    monkeypatch.setattr(text, "SPLIT_RULE", "another rule")
    text.build_corpus(root, files, tmp_path / "cache", "bytes", 256, 16, 4)
    assert len(list((tmp_path / "cache").glob("text_*.npz"))) == 2  # tokens cached under one rule are not reused


def test_the_tokenizer_learns_from_a_bounded_sample_spread_over_the_corpus():
    from codistill.data.text import tokenizer_sample

    docs = [f"{i:04d} " + "x" * (1000 + i) for i in range(500)]  # ~750 k characters
    sample = tokenizer_sample(docs, limit=100_000)
    assert sum(map(len, sample)) == 100_000 and sample == tokenizer_sample(docs[::-1], limit=100_000)
    picked = sorted(int(s[:4]) for s in sample)
    assert picked[0] < 100 and picked[-1] > 400  # from across the corpus, not its first files
    assert sorted(tokenizer_sample(docs[:3], limit=100_000)) == docs[:3]  # a small corpus: all of it
