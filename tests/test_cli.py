"""The CLI in-process (no Ray): exit codes and one-line errors, born-again end to end."""

import pytest

from codistill.cli import main
from tests.conftest import REPO


def test_a_bad_key_is_one_line_naming_it_with_exit_2(capsys):
    assert main(["train", f"{REPO}/configs/dml_mnist1d.yaml", "--set", "method.temprature=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "method.temprature" in err and "temperature" in err


def test_per_peer_workers_for_an_every_step_method_is_one_line_with_exit_2(capsys):
    assert main(["train", f"{REPO}/configs/dml_mnist1d.yaml", "--set", "peers.1.workers=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "peers.1.workers" in err and "exchanges every step" in err


def test_a_broken_yaml_file_is_one_line_with_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmethod: [dml\n")
    assert main(["train", str(bad), "--backend", "local"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not valid YAML" in err and "line" in err


@pytest.mark.slow  # over ~1.5 s: the full tier (make test)
def test_born_again_runs_its_generations_and_prints_the_table(tmp_path, capsys):
    code = main(["born-again", f"{REPO}/configs/born_again_mnist1d.yaml", "--backend", "local", "--generations", "2",
                 "--set", f"ray.storage_path={tmp_path}", "--set", "train.steps=40", "--set", "train.eval_every=20",
                 "--set", "train.checkpoint_every=20"])
    assert code == 0
    out = capsys.readouterr().out
    assert "born_again_mnist1d-gen0" in out and "born_again_mnist1d-gen1" in out and "generations.parquet" in out
    assert (tmp_path / "born_again_mnist1d-gen1" / "records.parquet").exists()


def test_born_again_needs_its_section(capsys):
    assert main(["born-again", f"{REPO}/configs/dml_mnist1d.yaml", "--backend", "local"]) == 2
    assert "born_again" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["methods", "models", "datasets"])
def test_list_names_every_registered_entry_with_its_one_line(kind, capsys):
    from codistill.data import DATASETS
    from codistill.methods import METHODS
    from codistill.models import MODELS

    assert main(["list", kind]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    registry = {"methods": METHODS, "models": MODELS, "datasets": DATASETS}[kind]
    assert [line.split()[0] for line in lines] == registry.names()
    for line in lines:
        name, _, text = line.partition(" ")
        if name not in registry.user_entries():  # (other tests register entries of their own)
            assert len(text.split("[")[0].strip()) > 15, f"{kind} entry {name!r} has no one-line description"
