import glob
import os

import pytest

from codistill.config import ConfigError, dump_config, load_config
from codistill.engine.run import prepare_run
from tests.conftest import REPO

BASE = {"name": "t", "method": {"name": "dml"}, "peers": [{"model": "mnist1d_cnn"}, {"model": "mnist1d_mlp"}]}


def with_changes(**changes):
    data = {**BASE, **changes}
    return load_config(data)


def error_of(data=None, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(data if data is not None else BASE, overrides)
    return info.value


CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))


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


def test_resuming_a_run_with_another_method_setting_is_refused(tmp_path):
    prepare_run(load_config(BASE, [f"ray.storage_path={tmp_path}"]))
    prepare_run(load_config(BASE, [f"ray.storage_path={tmp_path}", "train.steps=99"]))  # longer: allowed
    with pytest.raises(ConfigError) as info:
        prepare_run(load_config(BASE, [f"ray.storage_path={tmp_path}", "method.temperature=5"]))
    assert info.value.path == "method" and "another `name`" in info.value.message


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
    """`--set '…'` lines in a config's header comments are instructions to users: each must load
    (with a teacher of the right kind standing in for a run not trained here)."""
    import re

    from codistill.data import DATASETS

    text = open(path).read()
    base = load_config(path)
    stand_in = {"image": "resnet110", "sequence": "mnist1d_cnn_wide"}[DATASETS[base.data.name].input_kind]
    teacher = [f"teacher.model={stand_in}"] if base.teacher is not None else []
    for override in re.findall(r"--set '([^']+)'", text):
        assert load_config(path, [override, *teacher]).method is not None
