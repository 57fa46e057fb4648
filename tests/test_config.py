import glob
import os

import pytest

from codistill.config import ConfigError, dump_config, load_config
from codistill.engine.run import train
from tests.conftest import REPO

BASE = {"name": "t", "method": {"name": "dml"}, "peers": [{"model": "mnist1d_cnn"}, {"model": "mnist1d_mlp"}]}


def with_changes(**changes):
    data = {**BASE, **changes}
    return load_config(data)


def error_of(data=None, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(data if data is not None else BASE, overrides)
    return info.value


# Recipes that name a model folder and a corpus of the user's: loaded with such files made for
# the test, in test_hf.py.
NEEDS_USER_FILES = {"codistill_hf_gpu.yaml", "codistill_hf_fsdp_gpu.yaml"}
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.yaml")) if os.path.basename(p) not in NEEDS_USER_FILES)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_loads_and_round_trips(path):
    import yaml

    cfg = load_config(path)
    assert cfg.name == os.path.basename(path)[:-len(".yaml")]  # a config's run is named after its file
    assert load_config(yaml.safe_load(dump_config(cfg))) == cfg


def test_the_demo_config_is_dml_of_two_peers():
    cfg = load_config(f"{REPO}/configs/dml_mnist1d.yaml")
    assert cfg.method.name == "dml" and cfg.num_peers == 2


def test_unknown_key_names_its_path_and_the_allowed_keys():
    err = error_of({**BASE, "method": {"name": "dml", "temprature": 3}})
    assert err.path == "method.temprature"
    assert "temperature" in err.message and "not a setting of method 'dml'" in err.message


def test_unknown_key_inside_a_peer():
    err = error_of({**BASE, "peers": [{"model": "mnist1d_cnn"}, {"model": "mnist1d_cnn", "optimiser": {}}]})
    assert err.path == "peers.1.optimiser"


def test_wrong_type_names_the_key():
    err = error_of(overrides=["train.steps=lots"])
    assert err.path == "train.steps" and "integer" in err.message


@pytest.mark.parametrize("value", ["0", "-1.5"])
def test_temperature_must_be_positive(value):
    err = error_of(overrides=[f"method.temperature={value}"])
    assert err.path == "method.temperature" and "> 0" in err.message


def test_dml_needs_two_peers():
    err = error_of({**BASE, "peers": [{"model": "mnist1d_cnn"}]})
    assert err.path == "peers" and "at least 2" in err.message


def test_unknown_model_lists_the_registered_ones():
    err = error_of(overrides=["peers.0.model=resnet7"])
    assert err.path == "peers.0.model"
    assert "resnet20" in err.message and "mnist1d_cnn" in err.message


def test_unknown_data_set_and_method_list_what_exists():
    assert "mnist1d" in error_of(overrides=["data.name=mnist2d"]).message
    err = error_of({**BASE, "method": {"name": "dlm"}})
    assert err.path == "method.name" and "dml" in err.message


def test_model_must_fit_the_data():
    err = error_of(overrides=["peers.1.model=resnet20"])
    assert err.path == "peers.1.model" and "image" in err.message and "mnist1d_cnn" in err.message


def test_choice_fields_list_allowed_values():
    err = error_of(overrides=["exchange.transport=carrier_pigeon"])
    assert err.path == "exchange.transport" and "'collective'" in err.message


def test_overrides_reach_lists_and_wildcards():
    cfg = load_config(BASE, ["peers.*.optimizer.lr=0.05", "peers.1.model=mnist1d_cnn", "method.temperature=4",
                             "ray.resources_per_peer={GPU: 1}"])
    assert [p.optimizer.lr for p in cfg.peers] == [0.05, 0.05]
    assert cfg.peers[1].model == "mnist1d_cnn"
    assert cfg.method.temperature == 4.0
    assert cfg.ray.resources_per_peer == {"GPU": 1.0}
    assert error_of(overrides=["peers.5.model=x"]).path == "peers.5"


def trained_run(tmp_path, *overrides):
    quick = [f"ray.storage_path={tmp_path}", "train.steps=4", "train.eval_every=2", "train.checkpoint_every=2",
             "data.name=synthetic", "data.batch_size=50", *overrides]
    return train(load_config(BASE, quick), "local"), quick


def test_resuming_a_run_with_another_method_setting_is_refused(tmp_path):
    _, quick = trained_run(tmp_path)
    with pytest.raises(ConfigError) as info:
        train(load_config(BASE, [*quick, "method.temperature=5"]), "local")
    assert info.value.path == "method.temperature" and "another `name`" in info.value.message


def test_train_steps_may_change_on_resume_only_where_no_rate_depends_on_them(tmp_path):
    _, quick = trained_run(tmp_path, "peers.*.optimizer.schedule=cosine")
    with pytest.raises(ConfigError) as info:  # the cosine schedule would jump at the resume step
        train(load_config(BASE, [*quick, "train.steps=8"]), "local")
    assert info.value.path == "train.steps" and "cosine" in info.value.message and "train.steps=4" in info.value.message
    _, constant = trained_run(tmp_path, "name=constant")
    assert train(load_config(BASE, [*constant, "train.steps=8"]), "local").config.train.steps == 8  # constant: may grow
    with pytest.raises(ConfigError) as info:  # never below what the run has trained
        train(load_config(BASE, [*constant, "train.steps=2"]), "local")
    assert info.value.path == "train.steps" and "trained 8 steps" in info.value.message  # it grew to 8 above


def test_a_run_stored_before_a_setting_existed_resumes_at_that_settings_default(tmp_path):
    import yaml

    result, quick = trained_run(tmp_path)
    stored = yaml.safe_load(result.storage.read_bytes("config.yaml").decode())
    for key in ("path", "tokenizer", "vocab_size", "context", "test_windows"):  # what the data section gained since
        del stored["data"][key]
    del stored["peers"][0]["model_args"]
    result.storage.write_bytes("config.yaml", yaml.safe_dump(stored).encode())
    assert train(load_config(BASE, quick), "local").config.data.context == 128  # resumes: it trained at the defaults
    with pytest.raises(ConfigError) as info:  # but not at another value of the new setting
        train(load_config(BASE, [*quick, "data.context=64"]), "local")
    assert info.value.path == "data.context" and "64" in info.value.message


def test_a_run_that_failed_before_its_first_checkpoint_does_not_lock_its_name(tmp_path):
    from torch import nn

    from codistill.models import MODELS, register_model

    class FailsAtItsFirstStep(nn.Module):
        def forward(self, x):
            raise RuntimeError("a model that fails at its first step")

    if "test_fails_at_its_first_step" not in MODELS:
        register_model("test_fails_at_its_first_step", input_kind="sequence")(lambda num_classes: FailsAtItsFirstStep())
    quick = [f"ray.storage_path={tmp_path}", "train.steps=4", "train.eval_every=2", "train.checkpoint_every=2",
             "data.name=synthetic", "data.batch_size=50"]
    with pytest.raises(Exception, match="fails at its first step"):  # the config is stored, then it fails
        train(load_config(BASE, [*quick, "peers.1.model=test_fails_at_its_first_step", "method.temperature=5"]), "local")
    result = train(load_config(BASE, quick), "local")  # the corrected re-run starts: the name is not locked
    assert "temperature: 5" not in result.storage.read_bytes("config.yaml").decode() and result.config.train.steps == 4


@pytest.mark.parametrize("overrides,key,words", [
    (["data.batch_size=5000"], "data.batch_size", "4000 training examples"),
    (["data.train_subset=50"], "data.batch_size", "raise data.train_subset"),
    (["data.shard=true", "data.batch_size=2500"], "data.batch_size", "shard"),
    (["seed=18446744073709551616"], "seed", "2**53"),
    (["name=../x"], "name", "one folder name"),
    (["name=/abs/path"], "name", "one folder name"),
    (["name=''"], "name", "one folder name"),
])
def test_what_would_fail_at_start_up_fails_at_load(overrides, key, words):
    err = error_of({**BASE, "data": {"name": "mnist1d", "batch_size": 100}}, overrides)
    assert err.path == key and words in err.message


def test_storage_and_data_folders_that_cannot_work_are_one_line_errors(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert error_of(overrides=[f"data.root={a_file}"]).path == "data.root"
    for storage_path, words in ((f"{a_file}", "cannot use"), ("foo://bucket/runs", "unknown storage scheme")):
        with pytest.raises(ConfigError) as info:
            train(load_config(BASE, [f"ray.storage_path={storage_path}"]), "local")
        assert info.value.path == "ray.storage_path" and words in info.value.message
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        if os.access(read_only, os.W_OK):
            pytest.skip("running as a user who may write anywhere (root): a read-only folder cannot be made")
        with pytest.raises(ConfigError) as info:
            train(load_config(BASE, [f"ray.storage_path={read_only}"]), "local")
        assert info.value.path == "ray.storage_path"
    finally:
        read_only.chmod(0o700)


def test_unreachable_storage_is_a_one_line_error_within_the_time_limit(monkeypatch):
    import time

    import codistill.storage as storage

    monkeypatch.setattr(storage, "STORAGE_TIMEOUT_S", 2.0)
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:  # no network here: the filesystem call hangs or fails
        storage.open_run_storage("gs://codistill-no-such-bucket/runs", "x")
    # A guard against the call hanging past the storage limit (2 s), scaled to the machine.
    from tests.conftest import scaled

    assert info.value.path == "ray.storage_path" and time.monotonic() - started < 2.0 + scaled(8)


@pytest.mark.parametrize("space,path,message", [
    ({"method.temprature": "uniform(1, 2)"}, "tune.space.method.temprature", "not a setting"),
    ({"method.weight": "normal(0, 1)"}, "tune.space.method.weight", "loguniform(low, high"),
    ({"method.weight": "uniform(1)"}, "tune.space.method.weight", "low, high"),
    ({"method.temperature": "loguniform(0, 10)"}, "tune.space.method.temperature", "low > 0"),
    ({"method.temperature": "uniform(-1, 1)"}, "tune.space.method.temperature", "must be > 0"),
    ({"peers.*.model": "choice([mnist1d_cnn, lenet])"}, "tune.space.peers.*.model", "unknown model"),
])
def test_a_bad_search_space_names_the_key(space, path, message):
    err = error_of({**BASE, "tune": {"space": space}})
    assert err.path == path and message in err.message


def test_a_good_search_space_loads():
    cfg = load_config(f"{REPO}/configs/tune_dml_mnist1d.yaml")
    assert set(cfg.tune.space) == {"method.temperature", "method.weight", "peers.*.optimizer.lr"}


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e400"])
def test_float_settings_must_be_finite(value):
    err = error_of(overrides=[f"peers.0.optimizer.lr={value}"])
    assert err.path == "peers.0.optimizer.lr" and "finite" in err.message


def test_yaml_mistakes_are_one_line_errors(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("method: {name: dml\npeers: []\n")
    err = error_of(str(broken))
    assert "not valid YAML" in err.message and "line" in err.message and "\n" not in str(err)
    assert "folder" in error_of(str(tmp_path)).message
    binary = tmp_path / "weights.pt"
    binary.write_bytes(bytes(range(256)))
    assert "not a text file" in error_of(str(binary)).message
    err = error_of(overrides=["method.temperature=[1, 2"])
    assert err.path == "method.temperature" and "YAML" in err.message


def test_the_method_section_is_chosen_by_its_name_and_may_be_short():
    assert load_config({**BASE, "method": "dml"}).method == load_config(BASE).method
    err = error_of({**BASE, "method": {"temperature": 3}})
    assert err.path == "method.name" and "dml" in err.message and "kd" in err.message


def test_also_terms_are_checked_like_methods():
    err = error_of({**BASE, "method": {"name": "dml", "also": [{"name": "one"}]}})
    assert err.path == "method.also.0.name" and "cannot be added" in err.message
    err = error_of({**BASE, "method": {"name": "dml", "also": [{"name": "at", "source": "peers", "taps": ["conv2"]}]}})
    assert err.path == "method.taps" and "mnist1d_mlp" in err.message and "hidden1" in err.message


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_override_a_config_documents_loads(path):
    """`--set '…'` lines in a config's header comments are instructions to users: each line must load
    (with a teacher of the right kind standing in for a run not trained here)."""
    import re

    from codistill.data import DATASETS

    text = open(path).read()
    base = load_config(path)
    stand_in = {"image": "resnet110", "sequence": "mnist1d_cnn_wide", "tokens": "gpt"}[DATASETS[base.data.name].input_kind]
    teacher = [f"teacher.model={stand_in}"] if base.teacher is not None else []
    for line in text.splitlines():  # the overrides of one command line load together
        overrides = re.findall(r"--set '([^']+)'", line)
        if overrides:
            assert load_config(path, [*overrides, *teacher]).method is not None


def test_an_error_becomes_one_line_even_without_a_message():
    from codistill.errors import first_line

    assert first_line(ValueError("bad value\nsecond line")) == "bad value"
    assert first_line(ValueError()) == "ValueError"  # the copies this replaced raised IndexError here
    assert first_line(OSError("x" * 500), 200) == "x" * 200


def test_a_methods_needs_are_declared_once_by_its_config_and_the_traits_follow_from_them():
    """The driver reads what a method consumes from its config, without building it; the
    method serves exactly that; a method class that declares needs of its own is refused."""
    from codistill import Method, MethodConfig
    from codistill.config.method import METHOD_CONFIGS, registered_with
    from codistill.methods import create_method

    checked = 0
    for name in METHOD_CONFIGS.names():
        try:
            cfg = load_config(os.path.join(REPO, "configs/dml_mnist1d.yaml"), [f"method={{name: {name}}}"]).method
        except ConfigError:
            continue  # a method that needs more than its name (taps, a teacher)
        # What each method consumes, as its paper says: checked against a list written here,
        # not against the definition of the trait.
        assert bool(cfg.needs.peers) == (name not in ("independent", "codistill")), name
        assert (cfg.needs.rounds is not None) == (name == "codistill") == cfg.exchanges_in_rounds, name
        assert not cfg.needs.teacher and create_method(cfg).needs == cfg.needs, name  # the method serves it
        checked += 1
    assert checked >= 5 and load_config(os.path.join(REPO, "configs/codistill_mnist1d.yaml")).layout == "apart"
    assert registered_with("exchanges_in_rounds") == ["codistill"]
    # The traits follow the settings: AT reads taps; from a teacher it uses one, between peers not.
    at = load_config(os.path.join(REPO, "configs/dml_mnist1d.yaml"),
                     ["method={name: at, taps: [conv2], source: peers}"]).method
    assert at.reads_taps and not at.uses_teacher and at.needs.peers and not at.needs.teacher
    dml_at = load_config(os.path.join(REPO, "configs/dml_mnist1d.yaml"),
                         ["method={name: dml, also: [{name: at, taps: [conv2], source: peers}]}"]).method
    assert dml_at.reads_taps and dml_at.needs.taps == frozenset({"conv2"})
    with pytest.raises(TypeError, match="declared by its config class"):
        class Stale(Method):  # noqa: F841 -- the form before stop 37
            config_class = MethodConfig

            def own_needs(self):
                return None


@pytest.mark.parametrize("base,overrides,key", [
    ("configs/dml_mnist1d.yaml", ["peers.1.workers=2"], "peers.1.workers"),
    ("configs/dml_mnist1d.yaml", ["peers.0.resources={CPU: 2}"], "peers.0.resources"),
    ("configs/codistill_mnist1d.yaml", ["peers.1.workers=2", "ray.layout=one_group"], "peers.1.workers"),
])
def test_per_peer_sizes_are_refused_where_the_peers_run_as_one_group(base, overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(os.path.join(REPO, base), overrides)
    assert err.value.path == key and "one group" in str(err.value) and "codistill" in str(err.value)
    assert f"ray.{'workers' if key.endswith('workers') else 'resources'}_per_peer" in str(err.value)
    cfg = load_config(os.path.join(REPO, "configs/codistill_mnist1d.yaml"), ["peers.0.workers=2"])
    assert [cfg.workers_of(k) for k in (0, 1)] == [2, 1]


def test_switching_the_method_by_name_drops_the_files_settings_of_the_old_one(capsys):
    """KD's temperature 4 must not become CRD's τ: a switched method starts from its own
    defaults, keeping only what --set gives it."""
    cfg = load_config(os.path.join(REPO, "configs/kd_mnist1d.yaml"), ["method.name=crd", "method.negatives=256"])
    assert cfg.method.name == "crd" and cfg.method.temperature == 0.07 and cfg.method.negatives == 256
    assert "kd settings (temperature, alpha) were dropped" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="method.temperatur"):  # a mistyped --set is still refused
        load_config(os.path.join(REPO, "configs/kd_mnist1d.yaml"), ["method.name=crd", "method.temperatur=1"])
    same = load_config(os.path.join(REPO, "configs/kd_mnist1d.yaml"), ["method.name=kd"])
    assert same.method.temperature == 4.0  # the same method: nothing dropped
