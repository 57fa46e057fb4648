"""Hostile and careless corpora for `hf_text` (issue 43, items 4, 5, 7, 8, 16): a file replaced
with its mtime kept, a tokens cache cut short or damaged, rows whose text is not a string, empty
and non-UTF-8 files, a corpus smaller than a batch, a vocabulary refusal that names its peer —
each the new corpus or one line, never the old corpus or a traceback. Tiny corpora made here."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from codistill.config import ConfigError, load_config
from tests.test_hf import LLAMA, documents, hf_config

pytest.importorskip("transformers")
pytest.importorskip("datasets")


def write_jsonl(path, rows) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def load(tmp_path, path, **data):
    from codistill.data import load_data

    return load_data(load_config(hf_config(tmp_path, path, data=data)).data)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    write_jsonl(path, [{"body": text} for text in documents(60)])
    return path


def train_cache(tmp_path):
    (cache,) = (tmp_path / "cache").glob("hf_text_*_train.arrow")
    return cache


def test_a_corpus_file_replaced_with_its_mtime_kept_is_read_again(tmp_path, corpus):
    # `cp -p`, `rsync -a`, `tar x`: another corpus of the same size, at the same path, with the same
    # modification time. `datasets` keys its cache of a local file by path and mtime.
    before = load(tmp_path, corpus)
    stat = os.stat(corpus)
    swap = str.maketrans("aeiou", "uoiea")  # the same length, other words
    write_jsonl(corpus, [{"body": text.translate(swap)} for text in documents(60)])
    assert os.stat(corpus).st_size == stat.st_size
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = load(tmp_path, corpus)
    assert after.fingerprint.corpus_sha256 != before.fingerprint.corpus_sha256
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(after.tokenizer)
    text = tokenizer.decode(after.x_train.flatten().tolist())
    assert "qaick" in text and "quick" not in text  # the new words, not the old


def test_a_tokens_cache_cut_at_a_record_batch_is_rebuilt_saying_why(tmp_path, corpus, caplog):
    import pyarrow as pa

    whole = load(tmp_path, corpus)
    cache = train_cache(tmp_path)
    counts = json.loads(cache.with_name(cache.stem + ".counts.json").read_text())
    assert counts["rows"] > 10 and counts["tokens"] > 100
    # A valid Arrow stream with the first half of the rows: what a copy cut at a record batch reads as.
    with pa.memory_map(str(cache)) as source:
        table = pa.ipc.open_stream(source).read_all()
    with pa.OSFile(str(cache), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.slice(0, table.num_rows // 2))
    again = load(tmp_path, corpus)
    assert again.fingerprint.train_tokens == whole.fingerprint.train_tokens
    assert f"rebuilding the tokens cache: it holds {table.num_rows // 2} documents, not {table.num_rows}" in caplog.text
    # Rows the same but tokens other than those recorded (a counts file of another write): rebuilt.
    where = cache.with_name(cache.stem + ".counts.json")
    where.write_text(json.dumps({**counts, "tokens": counts["tokens"] + 1}))
    caplog.clear()
    assert load(tmp_path, corpus).fingerprint == whole.fingerprint
    assert f"not the {counts['rows']} and {counts['tokens'] + 1} recorded" in caplog.text
    assert json.loads(where.read_text()) == counts


def test_a_resume_on_other_token_counts_is_refused():
    # The fingerprint carries the counts and its comparison covers them: a checkpoint trained on a
    # shorter cache of the same corpus (same hash, same tokenizer) is another corpus.
    from codistill.data.task import PACKING, Fingerprint

    saw = Fingerprint(corpus_sha256="c" * 64, split="content", packing=PACKING, tokenizer_sha256="t" * 64,
                      vocab_size=300, train_tokens=11_682_052, test_tokens=1_000)
    now = replace(saw, train_tokens=5_820_000)
    assert saw.difference(saw) is None
    assert "11682052 training and 1000 test tokens" in now.difference(saw)
    assert "5820000 and 1000" in now.difference(saw)
    assert replace(saw, test_tokens=999).difference(saw) is not None


def test_a_tokens_cache_damaged_mid_batch_is_rebuilt_not_a_traceback(tmp_path, corpus, caplog):
    whole = load(tmp_path, corpus)
    cache = train_cache(tmp_path)
    data = cache.read_bytes()
    cache.write_bytes(data[:len(data) * 2 // 3])  # cut inside the record batch
    for _ in range(2):  # and on every later run: rebuilt once, then whole
        assert load(tmp_path, corpus).fingerprint == whole.fingerprint
    assert caplog.text.count("rebuilding the tokens cache: it does not read") == 1


@pytest.mark.parametrize("bad, said", [({"id": 1}, "missing or null"), ({"body": None}, "missing or null"),
                                       ({"body": 7}, "a int (7)"), ({"body": ["a", "b"]}, "a list (['a', 'b'])")])
def test_rows_whose_text_is_not_a_string_are_refused_with_their_number(tmp_path, bad, said):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"body": "a fox"}, {"body": "a dog"}, bad, {"body": "a cat"}])
    with pytest.raises(ConfigError) as info:
        load(tmp_path, path)
    assert info.value.path == "data.text_field"
    assert f"row 3 of {path} (counting from 1): 'body' is {said}; every row's text must be a string" \
        in info.value.message


def test_a_column_of_numbers_is_refused_at_its_first_row(tmp_path):
    path = tmp_path / "numbers.jsonl"
    write_jsonl(path, [{"body": n} for n in range(5)])
    with pytest.raises(ConfigError, match=r"data.text_field: row 1 of .* 'body' is a int \(0\)"):
        load(tmp_path, path)


def test_an_empty_jsonl_is_one_line_naming_it(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ConfigError, match=rf"data.path: {path} is empty: it holds no rows"):
        load(tmp_path, path)


@pytest.mark.parametrize("name, content", [("bad.jsonl", b'{"body": "caf\xe9 ole"}\n'),
                                           ("bad.txt", b"caf\xe9 ole, a text of many words\n"),
                                           ("cut.txt", "a text that ends in a cut caf\u00e9".encode()[:-1])])
def test_a_file_that_is_not_utf8_is_one_line_naming_it(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load(tmp_path, path)
    assert info.value.path == "data.path" and info.value.message.startswith(f"{path} is not UTF-8 text")


def test_the_byte_named_is_the_bad_one_also_across_a_read(tmp_path, monkeypatch):
    from codistill.data import hf_text

    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"body": "caf\xe9 ole"}\n')  # byte 13 starts a character that never ends
    for size in (1 << 20, 14):  # 14: the read ends just after it
        monkeypatch.setattr(hf_text, "READ_BYTES", size)
        with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 13: invalid continuation byte\)"):
            load(tmp_path, path)


def test_a_corpus_smaller_than_one_batch_is_one_line_exit_2(tmp_path, capsys):
    import yaml

    from codistill.cli import main
    from codistill.data import BatchSchedule

    with pytest.raises(ConfigError) as info:
        BatchSchedule(3, 4, seed=0)
    assert info.value.path == "data.batch_size" and "more than the 3 training examples" in info.value.message
    path = tmp_path / "tiny.jsonl"
    write_jsonl(path, [{"body": text} for text in documents(12)])
    cfg = hf_config(tmp_path, path, data={"batch_size": 4000})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "tiny.yaml"), "--backend", "local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("config error: data.batch_size: is 4000, more than the") and "Traceback" not in err


@pytest.mark.slow
def test_a_vocabulary_refusal_names_the_peer(tmp_path, corpus):
    from codistill.engine.run import train

    cfg = hf_config(tmp_path, corpus)
    cfg["peers"][1] = {**cfg["peers"][1], "model_args": {"config": {**LLAMA, "vocab_size": 200}}}
    with pytest.raises(ConfigError) as info:
        train(load_config(cfg), backend="local")
    assert info.value.path == "peers.1.model_args.config.vocab_size"
    assert "is 200, but the tokenizer has" in info.value.message
