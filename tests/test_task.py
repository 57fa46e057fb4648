"""The task a data set declares (`codistill/data/task.py`): what a row is, how a group is scored,
the top-k default, the typed fingerprint, and the one packing rule of every text corpus."""

import doctest

import pytest
import torch

from codistill.data import ArrayDataset
from codistill.data.task import (OLD_TEXT_PACKING, PACKING, Classes, Fingerprint, NextToken, pack, task_of,
                                 token_stream)


def test_the_packing_rule_is_its_doctest_and_ends_every_document():
    from codistill.data import task

    assert doctest.testmod(task).failed == 0
    x, y = pack([[1, 2], [3], [4, 5, 6]], context=4, end_of_text=9)
    assert token_stream([[1, 2], [3], [4, 5, 6]], 9).tolist() == [1, 2, 9, 3, 9, 4, 5, 6, 9]
    assert x.tolist() == [[1, 2, 9, 3], [9, 4, 5, 6]] and y.tolist() == [[2, 9, 3, 9], [4, 5, 6, 9]]
    x, y = pack([[1, 2, 3, 4, 5]], context=4, end_of_text=0)  # a tail: padded, its labels count for nothing
    assert x.tolist() == [[1, 2, 3, 4], [5, 0, 0, 0]] and y.tolist() == [[2, 3, 4, 5], [0, -100, -100, -100]]


def test_data_declares_its_task_and_the_old_spelling_still_works():
    x, y = torch.zeros(4, 8, dtype=torch.long), torch.zeros(4, 8, dtype=torch.long)
    old = ArrayDataset(x, y, x, y, num_classes=50, input_kind="tokens")
    assert old.task == NextToken(50) and old.rows(x) == 32 and old.task.labels(y).shape == (32,)
    new = ArrayDataset(x, y, x, y, num_classes=50, task=NextToken(50))  # the input kind follows from the task
    assert new.input_kind == "tokens" and new.fingerprint is None and new.tokenizer is None
    sequences = ArrayDataset(torch.zeros(4, 1, 8), torch.zeros(4, dtype=torch.long), torch.zeros(4, 1, 8),
                             torch.zeros(4, dtype=torch.long), num_classes=3, input_kind="sequence")
    assert sequences.task == Classes(3) and task_of("image", 10) == Classes(10)
    with pytest.raises(ValueError, match="input kind"):
        ArrayDataset(x, y, x, y, num_classes=3, task=Classes(3))
    with pytest.raises(ValueError, match="outputs"):
        ArrayDataset(x, y, x, y, num_classes=3, task=NextToken(4))


def test_a_task_scores_its_group_in_its_own_direction():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 7, (20,), generator=g)
    logits = [torch.randn(20, 7, generator=g) for _ in range(2)]
    classes = Classes.score_group(logits, labels)
    assert "peer0_bits" not in classes and Classes.score.name == "accuracy" and not Classes.score.lower_is_better
    padded = labels.clone()
    padded[-4:] = -100
    tokens = NextToken.score_group(logits, padded)  # padded rows dropped before anything is counted
    kept = Classes.score_group([z[:-4] for z in logits], labels[:-4])
    assert tokens["peer1_accuracy"] == kept["peer1_accuracy"] and tokens["ensemble_bits"] > 0
    assert NextToken.score.lower_is_better and NextToken.score.better(2.0, 2.5)
    assert NextToken.peer_record(tokens, 1) == {"metric": "bits", "bits": tokens["peer1_bits"]}
    assert NextToken(32_000).default_top_k(16_384) == 64 and NextToken(300).default_top_k(16_384) == 0
    assert Classes(32_000).default_top_k(16_384) == 0


def _fingerprint(**changed) -> Fingerprint:
    base = dict(corpus_sha256="c" * 64, split="content", packing=PACKING, tokenizer_sha256="a" * 64, vocab_size=300,
                train_tokens=1000, test_tokens=100, files=7, tokenizer="{'path': '/here/tok'}",
                tokenizer_place="/here/tok", cache="text_x.npz")
    return Fingerprint(**{**base, **changed})


def test_the_fingerprint_compares_what_the_ids_are_not_where_they_are():
    here = _fingerprint()
    assert here == _fingerprint(tokenizer_place="/elsewhere/tok", tokenizer="{'path': '/elsewhere/tok'}",
                                cache="other")  # the same ids, on another machine
    assert here.difference(Fingerprint.from_dict(here.as_dict())) is None
    assert Fingerprint.from_dict(here.as_dict()) == here and here["corpus_sha256"] == "c" * 64
    message = here.difference(_fingerprint(tokenizer_sha256="b" * 64))
    assert "b" * 16 in message and "a" * 16 in message and "tokenizer" in message  # both hashes named
    assert "packed" in here.difference(_fingerprint(packing=OLD_TEXT_PACKING))
    assert "1000" in here.difference(_fingerprint(train_tokens=999))
    # Written before the packing and the tokenizer's hash were kept: a text corpus was packed by the old rule.
    old_text = {"corpus_sha256": "c" * 64, "files": 7, "duplicates": 0, "split": "content", "tokenizer": "bytes",
                "vocab_size": 256, "train_tokens": 1000, "test_tokens": 100, "cache": "text_x.npz"}
    assert Fingerprint.from_dict(old_text).packing == OLD_TEXT_PACKING
    assert Fingerprint.from_dict({**old_text, "cache": "hf_text_y"}).packing == PACKING


def test_tokens_cached_under_another_packing_rule_are_rebuilt(tmp_path, monkeypatch):
    from codistill.data import text

    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i:02d}.txt").write_text(f"document {i}: " + " ".join(f"w{i * j % 31}" for j in range(40)) + "\n")
    root, files = text.text_files(str(folder))
    first = text.build_corpus(root, files, tmp_path / "cache", "bytes", 256, 16, 4)
    monkeypatch.setattr(text, "PACKING", "another rule")
    second = text.build_corpus(root, files, tmp_path / "cache", "bytes", 256, 16, 4)
    assert len(list((tmp_path / "cache").glob("text_*.npz"))) == 2  # not the old tokens
    assert second.fingerprint.packing == "another rule" and first.fingerprint.difference(second.fingerprint)


def test_the_group_figures_of_next_tokens_count_no_padded_row_and_records_name_their_score():
    import pyarrow as pa

    from codistill.engine.evaluate import group_figures
    from codistill.records import final_metrics, summary_text

    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (30,), generator=g)
    labels[-10:] = -100
    payloads = [{"logits": torch.randn(30, 5, generator=g)} for _ in range(2)]
    figures = group_figures(payloads, labels, NextToken)
    # The members (here the peers) are scored over the same rows as the peers: padded rows count for nothing.
    assert figures["member_mean_accuracy"] == pytest.approx(figures["mean_accuracy"])
    assert figures["member_churn"] == pytest.approx(figures["churn"]) and "ensemble_bits" in figures
    rows = [{"step": 10, "peer": k, "split": "test", "accuracy": figures[f"peer{k}_accuracy"],
             "ensemble_accuracy": figures["ensemble_accuracy"], "churn": figures["churn"],
             "ensemble_bits": figures["ensemble_bits"], **NextToken.peer_record(figures, k)} for k in range(2)]
    final = final_metrics(pa.Table.from_pylist(rows))
    assert final["score"] == "bits" and final["peer_bits"] == [figures["peer0_bits"], figures["peer1_bits"]]
    assert "bits/token" in summary_text(pa.Table.from_pylist(rows))
    plain = [{k: v for k, v in r.items() if k not in ("metric", "bits", "ensemble_bits")} for r in rows]
    assert "score" not in final_metrics(pa.Table.from_pylist(plain))  # accuracy alone
