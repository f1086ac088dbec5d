"""Config resolution and validation: every bad input names its key."""

import pytest
import yaml

from trainer.config import ConfigError, apply_override, load_config, resolve, validate


def test_full_profile_is_the_reference_study():
    cfg = resolve("gpt2", 20, 4096, 1, "full")
    assert cfg["model"] == {"n_embd": 256, "n_layer": 12, "n_head": 8, "C": 3, "family": "gpt2",
                            "n_dims": 20, "n_positions": 202, "V": 20, "truncated_dims": 5}
    t = cfg["training"]
    assert t["task"] == "table_connectivity"
    assert t["task_kwargs"] == {"C": 3, "rho": 0.5, "V": 20}
    assert (t["batch_size"], t["learning_rate"], t["train_steps"]) == (256, 1e-4, 1001)
    assert (t["save_every_steps"], t["keep_every_steps"]) == (100, 100)
    assert t["num_training_examples"] == 4096
    assert cfg["evaluation"] == {"eval_every": 100, "eval_examples": 1280}


def test_lowrank_defaults():
    cfg = resolve("lowrank_gpt2", 5, 256, 2, "full")
    assert cfg["model"]["n_dims"] == 5
    assert cfg["model"]["truncated_dims"] == 4  # the reference's 5 zeroed nothing at width 5
    assert cfg["model"]["n_positions"] == 5 * 4 + 3


def test_seeds_differ_between_runs_and_are_stable():
    a, b = resolve("gpt2", 5, 256, 1), resolve("gpt2", 5, 256, 2)
    assert a["seeds"]["run"] != b["seeds"]["run"]
    assert resolve("gpt2", 5, 256, 1)["seeds"] == a["seeds"]
    assert a["seeds"]["pool"] == b["seeds"]["pool"]  # nested pools across runs and N


def test_override_parses_yaml_and_rejects_unknown_keys():
    cfg = resolve("gpt2", 5, 256, 1, "smoke", ["training.train_steps=7", "model.n_dims=4",
                                               "model.truncated_dims=3"])
    assert cfg["training"]["train_steps"] == 7 and cfg["model"]["n_dims"] == 4
    assert cfg["model"]["truncated_dims"] == 3
    with pytest.raises(ConfigError, match="training.nope"):
        apply_override(cfg, "training.nope=1")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_override(cfg, "training.train_steps")


@pytest.mark.parametrize("args, key", [
    (("transformer", 5, 256, 1), "transformer"),
    (("gpt2", 0, 256, 1), "model.V"),
    (("gpt2", -3, 256, 1), "model.V"),
    (("gpt2", 5, 100, 1), "training.num_training_examples"),
    (("gpt2", 60, 256, 1), "model.n_positions"),
])
def test_bad_coordinates_name_the_key(args, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve(*args)


@pytest.mark.parametrize("raw", ["3e-4", "3E-4", "3.0e-4", "+3e-4", "0.0003", "3e-04"])
def test_every_way_of_typing_a_number_is_a_number(raw, tmp_path):
    """YAML 1.1 reads 3e-4 as a string; users type it that way."""
    cfg = resolve("gpt2", 5, 256, 1, "smoke", [f"training.learning_rate={raw}"])
    assert cfg["training"]["learning_rate"] == 3e-4
    assert resolve("gpt2", 5, 256, 1, "smoke", ["training.task_kwargs.rho=5e-1"])[
        "training"]["task_kwargs"]["rho"] == 0.5
    cfg["training"]["learning_rate"] = "REPLACE"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg).replace("REPLACE", raw))
    assert load_config(path)["training"]["learning_rate"] == 3e-4


def test_strings_that_only_look_like_numbers_stay_strings():
    with pytest.raises(ConfigError, match="model.family"):
        resolve("gpt2", 5, 256, 1, "smoke", ["model.family=1e5x"])


@pytest.mark.parametrize("override", ["model.truncated_dims=0", "model.truncated_dims=20",
                                      "model.truncated_dims=2.5"])
def test_truncated_dims_is_checked_against_the_width(override):
    with pytest.raises(ConfigError, match=r"model\.truncated_dims"):
        resolve("gpt2", 5, 256, 1, "smoke", [override])


@pytest.mark.parametrize("override, key", [
    ("training.learning_rate=-1", "training.learning_rate"),
    ("training.batch_size=abc", "training.batch_size"),
    ("training.task_kwargs.rho=1.5", "training.task_kwargs.rho"),
    ("model.n_head=5", "model.n_embd"),
    ("training.train_steps=true", "training.train_steps"),
    ("evaluation.eval_examples=0", "evaluation.eval_examples"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve("gpt2", 5, 256, 1, "smoke", [override])


def test_missing_and_unknown_keys_in_a_config_file(tmp_path):
    cfg = resolve("gpt2", 5, 256, 1, "smoke")
    del cfg["training"]["batch_size"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"c\.yaml: missing key 'training\.batch_size'"):
        load_config(path)
    cfg = resolve("gpt2", 5, 256, 1, "smoke")
    cfg["model"]["dropout"] = 0.1
    with pytest.raises(ConfigError, match=r"unknown key 'model\.dropout'"):
        validate(cfg)


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: invalid YAML"):
        load_config(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: expected a mapping"):
        load_config(path)


def test_unknown_profile():
    with pytest.raises(ConfigError, match="unknown profile 'huge'"):
        resolve("gpt2", 5, 256, 1, "huge")


def test_yaml_only_through_the_safe_loader(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)
