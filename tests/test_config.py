"""Run-config validation: bad values are rejected before training, naming the key."""

import tomllib
from pathlib import Path

import numpy as np
import pytest

from kta_flwr.config import ConfigError, RunConfig, parse_run_config
from kta_flwr.task.splits import load_splits, partition_indices

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_config_matches_runconfig_defaults():
    app_config = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert app_config == RunConfig().to_flwr()
    assert parse_run_config(app_config) == RunConfig()


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("strategy", "fedsgd", "kta"),
        ("num-server-rounds", 0, "positive"),
        ("local-epochs", -1, "positive"),
        ("learning-rate", 0.0, "positive"),
        ("learning-rate", float("nan"), "positive"),
        ("dirichlet-alpha", 0.0, "positive"),
        ("dirichlet-alpha", -0.5, "positive"),
        ("reference-size", 0, "positive"),
        ("fraction-train", 1.5, "(0, 1]"),
        ("lr-decay", 0.0, "(0, 1]"),
        ("lr-decay", 1.2, "(0, 1]"),
        ("holdout-fraction", 1.0, "[0, 1)"),
        ("holdout-fraction", -0.1, "[0, 1)"),
        ("distill-clip", -1.0, ">= 0"),
        ("prior-correction", "yes", "bool"),
        ("self-weight", 2.0, "[0, 1]"),
        ("models", "mlp,transformer9000", "mlp"),
        ("partitioner", "shards", "dirichlet"),
        ("num-server-rounds", "ten", "expected int"),
        ("device", "tpu", "cuda"),
    ],
)
def test_bad_values_name_the_key(key, value, needle):
    with pytest.raises(ConfigError) as err:
        parse_run_config({key: value})
    assert f"'{key}'" in str(err.value) and needle in str(err.value)


def test_background_teacher_needs_neighbours_in_logit_space():
    cfg = parse_run_config({"background-teacher": True, "neighbours": 16})
    assert cfg.background_teacher and cfg.neighbours == 16
    for values in ({}, {"neighbours": 16, "target-space": "prob"}):
        with pytest.raises(ConfigError, match="'background-teacher' = true needs 'neighbours' > 0"):
            parse_run_config({"background-teacher": True, **values})


def test_unknown_key_rejected():
    with pytest.raises(ConfigError, match="learning_rate"):
        parse_run_config({"learning_rate": 0.1})


def test_mixed_models_need_a_market_strategy():
    assert parse_run_config({"models": "mlp,cnn"}).model_for_partition(3) == "cnn"
    with pytest.raises(ConfigError, match="'models'.*fedavg"):
        parse_run_config({"models": "mlp,cnn", "strategy": "fedavg"})


def test_a_fleet_profile_gives_each_tier_a_third_of_the_partitions():
    cfg = parse_run_config({"fleet": "tiers3", "dataset": "cifar10", "seed": 3})
    tiers = [cfg.tier_of_partition(p) for p in range(30)]
    for block in range(10):  # every block of three holds each tier once
        assert sorted(tiers[3 * block:3 * block + 3]) == [0, 1, 2]
    assert tiers != [cfg.replace(seed=4).tier_of_partition(p) for p in range(30)]  # seeded
    assert tiers == [cfg.tier_of_partition(p) for p in range(30)]
    models = {cfg.model_for_partition(p) for p in range(30)}
    assert models == set(cfg.model_names) == {"simplecnn_small", "simplecnn", "resnet8"}
    assert cfg.model_for_partition(0) == cfg.fleet_tiers[tiers[0]][1]
    assert RunConfig().tier_of_partition(5) == 0 and RunConfig().fleet_tiers == ()


def test_a_fleet_must_name_a_profile_with_tiers_for_the_dataset():
    with pytest.raises(ConfigError, match="'fleet' = 'tiers9' is not allowed"):
        parse_run_config({"fleet": "tiers9"})
    with pytest.raises(ConfigError, match="'fleet' = 'tiers3' has no tiers for dataset 'agnews'"):
        parse_run_config({"fleet": "tiers3", "dataset": "agnews", "models": "textbag"})


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "krum", "fedavg-topk", "sapef"])
def test_strategies_that_average_weights_refuse_a_fleet(strategy):
    with pytest.raises(ConfigError, match=r"'fleet' = 'tiers3' gives the clients cnn \(small\).*"
                                          f"but strategy '{strategy}' averages weights"):
        parse_run_config({"strategy": strategy, "fleet": "tiers3"})


@pytest.mark.parametrize("strategy", ["kta", "fedmd", "ktpfl", "local", "fedkd", "fedproto", "fedavg-common"])
def test_market_strategies_and_fedkd_take_a_fleet(strategy):
    cfg = parse_run_config({"strategy": strategy, "fleet": "tiers3"})
    assert {cfg.model_for_partition(p) for p in range(3)} == {"cnn", "mlp", "resnet8"}


def test_heterofl_gives_every_tier_the_largest_tiers_model_at_the_tiers_width():
    cfg = parse_run_config({"strategy": "heterofl", "fleet": "tiers3", "seed": 3})
    assert {cfg.model_for_partition(p) for p in range(6)} == {"resnet8"}
    rates = [cfg.width_of_partition(p) for p in range(3)]
    assert sorted(rates) == [0.25, 0.5, 1.0]
    assert [cfg.tier_model(cfg.tier_of_partition(p)) for p in range(3)] == [f"resnet8@{r:g}" for r in rates]
    assert parse_run_config({"strategy": "heterofl"}).width_of_partition(4) == 1.0  # no fleet: FedAvg
    with pytest.raises(ConfigError, match="'heterofl-rates' = '0.5,1' gives 2 rate.*'tiers3' has 3 tiers"):
        parse_run_config({"strategy": "heterofl", "fleet": "tiers3", "heterofl-rates": "0.5,1"})
    with pytest.raises(ConfigError, match="'heterofl-rates' = '0,0.5,1': every rate must be in"):
        parse_run_config({"strategy": "heterofl", "fleet": "tiers3", "heterofl-rates": "0,0.5,1"})
    with pytest.raises(ConfigError, match="'heterofl-rates' = 'a,b,c' must be comma-separated numbers"):
        parse_run_config({"strategy": "heterofl", "fleet": "tiers3", "heterofl-rates": "a,b,c"})
    with pytest.raises(ConfigError, match="scales its global model 'resnet18' by width"):
        parse_run_config({"strategy": "heterofl", "models": "resnet18", "dataset": "cifar10"})


def test_fedproto_refuses_dp_its_prototypes_are_not_covered():
    with pytest.raises(ConfigError, match="'dp-epsilon'/'dp-noise' cannot be used with strategy 'fedproto'"):
        parse_run_config({"strategy": "fedproto", "dp-epsilon": 3.0})


def test_the_common_architecture_is_the_one_most_partitions_train_ties_to_the_larger():
    cfg = parse_run_config({"strategy": "fedavg-common", "fleet": "tiers3", "dataset": "cifar10"})
    assert cfg.common_architecture(3) == "resnet8"  # one each: the largest tier
    fourth = cfg.model_for_partition(3)  # partition 3 opens the second block
    assert cfg.common_architecture(4) == fourth


@pytest.mark.parametrize("values, key", [
    ({"strategy": "fedavg", "distill-augment": True}, "distill-augment"),
    ({"strategy": "fedrep", "reference-ce-weight": 0.5}, "reference-ce-weight"),
    ({"strategy": "fedavg-topk", "distill-label-mix": True}, "distill-label-mix"),
    ({"strategy": "local", "distill-label-mix": True}, "distill-label-mix"),
])
def test_distillation_switches_are_refused_by_strategies_without_that_stage(values, key):
    with pytest.raises(ConfigError, match=f"'{key}' applies to the distillation stage .* "
                                          f"strategy '{values['strategy']}' has none"):
        parse_run_config(values)
    assert parse_run_config({**values, "strategy": "kta"}).strategy == "kta"


def test_reference_larger_than_data_rejected():
    cfg = parse_run_config({"reference-size": 1700})
    with pytest.raises(ConfigError, match="'reference-size' = 1700"):
        load_splits(cfg)


def test_more_clients_than_samples_rejected():
    cfg = RunConfig()
    with pytest.raises(ConfigError, match="clients"):
        partition_indices(np.zeros(5, dtype=np.int64), 6, cfg)


def test_output_dir_relative_to_home():
    assert RunConfig(output_dir="runs").resolved_output_dir() == Path.home() / "runs"
    assert RunConfig(output_dir="/tmp/x").resolved_output_dir() == Path("/tmp/x")
