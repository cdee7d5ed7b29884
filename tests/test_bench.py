"""The benchmark harness: end to end on the embedded digits data (real Flower runs, slow),
and its tables from given run results."""

import json
import math

import pytest

from kta_flwr.config import ConfigError, RunConfig
from kta_flwr.flower.results import host_environment
from kta_flwr.tools.bench import (
    aggregate,
    RunResult,
    tier_table,
    machine_of,
    machines_note,
    markdown_table,
    paired_differences,
    run_bench,
)
from kta_flwr.tools.privacy_bench import run_privacy_bench

SMALL = {"num-server-rounds": 2, "reference-size": 100, "local-epochs": 1, "distill-epochs": 1,
         "tracking": "none"}


@pytest.mark.slow
def test_bench_two_methods_one_seed(tmp_path):
    summary = run_bench("digits", ["kta", "local"], [0], clients=2, out_dir=tmp_path, overrides=SMALL)
    out = tmp_path / "digits"
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["methods"].keys() == summary["methods"].keys() == {"kta", "local"}
    assert (out / "accuracy_vs_mib.png").stat().st_size > 10_000
    table = (out / "summary.md").read_text()
    assert table.startswith("| method |") and "| kta |" in table and "| local |" in table
    here = machine_of([host_environment()])
    assert f"- runs by machine (CPU / widest SIMD / torch): 2 on {here}\n" in table
    for run in on_disk["runs"]:
        (results,) = (out / "runs" / f"{run['method']}-seed0").glob("*/results.json")
        res = json.loads(results.read_text())
        assert run["mib_total"] == res["summary"]["bytes_total"] / 2**20
        assert len(run["curve"]) == 2
    kta = on_disk["methods"]["kta"]
    (results,) = (out / "runs" / "kta-seed0").glob("*/results.json")
    sent = json.loads(results.read_text())["train_metrics"]["1"]["distilling-clients"]
    # 2 rounds x 2 clients x 100 x 10 x 4 B up + 1 round of targets down, on the 80 rows
    # not held out, to the clients the market's gate let through
    assert kta["mib_total"][0] == pytest.approx((2 * 2 * 100 + sent * 80) * 10 * 4 / 2**20)
    assert on_disk["methods"]["local"]["mib_total"] == [0.0, 0.0]
    assert not math.isnan(kta["personalized"][0]) and kta["seeds"] == [0]

    # Summarise what is there without running anything: fedmd has no run yet.
    again = run_bench("digits", ["kta", "fedmd", "local"], [0], clients=2, out_dir=tmp_path,
                      overrides=SMALL, existing_only=True)
    assert again["missing_runs"] == ["fedmd seed 0"]
    assert again["methods"].keys() == {"kta", "local"}
    assert list(again["methods"]["kta"]["personalized"]) == kta["personalized"]
    assert "not run yet: fedmd seed 0" in (out / "summary.md").read_text()
    with pytest.raises(ConfigError, match="--paired-with: 'fedavg'"):
        run_bench("digits", ["kta", "local"], [0], clients=2, out_dir=tmp_path, overrides=SMALL,
                  existing_only=True, paired_with="fedavg")
    paired = run_bench("digits", ["kta", "local"], [0], clients=2, out_dir=tmp_path,
                       overrides=SMALL, existing_only=True, paired_with="local")
    (diff,) = paired["paired_differences"]["points_by_method"]["kta"]
    assert diff == (0, pytest.approx(100 * (kta["personalized"][0] - on_disk["methods"]["local"]["personalized"][0])))
    assert "Δ pers. vs local (points), by seed |" in (out / "summary.md").read_text()

    # Accuracy against epsilon: local-only again (reused) and with DP-SGD at epsilon 2.
    table = run_privacy_bench("digits", ["local"], [2.0, math.inf], [0], clients=2,
                              out_dir=tmp_path, overrides=SMALL, resume=True)
    assert list(table["local"]) == ["2", "inf"]
    assert list(table["local"]["inf"]["personalized"]) == on_disk["methods"]["local"]["personalized"]
    assert 0 < table["local"]["2"]["epsilon_spent"] <= 2.0 and math.isinf(table["local"]["inf"]["epsilon_spent"])
    assert "| local | 2 |" in (out / "privacy.md").read_text()
    assert (out / "accuracy_vs_epsilon.png").stat().st_size > 10_000
    partial = run_privacy_bench("digits", ["local"], [2.0, 5.0, math.inf], [0], clients=2,
                                out_dir=tmp_path, overrides=SMALL, existing_only=True)
    assert list(partial["local"]) == ["2", "inf"]  # nothing ran: epsilon 5 is listed as missing
    assert "not run yet: local:dp-epsilon=5 seed 0" in (out / "privacy.md").read_text()


def test_method_variants_carry_their_run_config():
    from kta_flwr.tools.bench import method_config  # pylint: disable=import-outside-toplevel

    cfg = method_config(RunConfig(), "kta:codec=topk:codec-topk=2")
    assert (cfg.strategy, cfg.codec, cfg.codec_topk) == ("kta", "topk", 2)
    assert method_config(RunConfig(), "fedavg").strategy == "fedavg"
    with pytest.raises(ConfigError, match="codec"):
        method_config(RunConfig(), "kta:codec=zip")


def test_robustness_runs_each_attack_where_it_applies_and_compares_like_with_like():
    from kta_flwr.tools.robustness import _score, markdown, methods_for  # pylint: disable=import-outside-toplevel

    methods = methods_for(["kta", "fedavg"], ["gaming", "negated"], [0.1, 0.2])
    assert methods == ["kta", "kta:attack=gaming:attack-fraction=0.1", "kta:attack=gaming:attack-fraction=0.2",
                       "fedavg", "fedavg:attack=negated:attack-fraction=0.1",
                       "fedavg:attack=negated:attack-fraction=0.2"]
    variant = methods_for(["sapef:update-aggregation=median"], ["gaming", "negated"], [0.2])
    assert variant == ["sapef:update-aggregation=median",
                       "sapef:update-aggregation=median:attack=negated:attack-fraction=0.2"]
    clean = {"0": 0.9, "1": 0.8, "2": 0.5}
    row = {"strategy": "kta", "attack": "gaming", "share": 0.34, "seed": 0, "attackers": [2],
           "clients": {"0": 0.85, "1": 0.8, "2": 0.0}}
    _score(row, clean)  # the attacker's partition is left out of both means
    assert row["honest_accuracy"] == pytest.approx(0.825) and row["clean_accuracy"] == pytest.approx(0.85)
    assert row["drop_points"] == pytest.approx(-2.5)
    clean_row = {"strategy": "kta", "attack": "none", "share": 0.0, "honest_accuracy": 0.73,
                 "drop_points": 0.0}
    table = markdown([clean_row, row])
    assert "| none (clean accuracy) | 0% | 0.7300 |" in table and "| gaming | 34% | -2.5 |" in table
    destroyed = {**row, "clients": {}}  # no valid final evaluation: the model was destroyed
    _score(destroyed, clean)
    assert math.isnan(destroyed["drop_points"]) and "| collapsed |" in markdown([clean_row, row, destroyed])


def test_paired_differences_match_seeds_and_fill_the_table_column():
    def run(method, seed, acc):
        return RunResult(method, seed, acc, acc / 2, 1.0, 10.0)

    runs = [run("exact", 0, 0.40), run("exact", 1, 0.38), run("exact", 2, 0.30),
            run("fast", 1, 0.37), run("fast", 0, 0.41), run("fast", 3, 0.99),  # seed 3: no pair
            run("other", 5, 0.5)]
    diffs = paired_differences(runs, "exact")
    assert set(diffs) == {"fast"}  # "other" shares no seed with the baseline
    assert [(seed, round(d, 6)) for seed, d in diffs["fast"]] == [(1, -1.0), (0, 1.0)]
    stats = {m: {"seeds": [0], "personalized": (0.4, 0.0), "global": (0.2, 0.0),
                 "mib_total": (1.0, 0.0), "mib_to_target": (1.0, 0.0), "reached_target": 1,
                 "wall_seconds": (10.0, 0.0)} for m in ("exact", "fast", "other")}
    table = markdown_table("digits", RunConfig(), stats, 0.3, ("exact", diffs))
    rows = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert rows["| fast"].endswith("| +0.00 (+1.00 / -1.00) |")  # seed order: 0, then 1
    assert rows["| exact"].endswith("| — |") and rows["| other"].endswith("| — |")
    assert "Δ pers. vs exact (points), by seed |" in table.splitlines()[0]
    assert "Δ pers. vs" not in markdown_table("digits", RunConfig(), stats, 0.3)


def test_the_table_says_on_which_machines_its_runs_ran():
    env = {"cpu": "CPU A", "simd": "avx2", "versions": {"torch": "2.14.1"}}
    other = {**env, "cpu": "CPU B", "simd": "avx512f"}
    assert machine_of([env, env]) == "CPU A / avx2 / torch 2.14.1"  # a resumed run, one host
    assert machine_of([{}, other]) == "CPU B / avx512f / torch 2.14.1"  # older part unknown
    assert machine_of([env, other]) == "CPU A / avx2 / torch 2.14.1 + CPU B / avx512f / torch 2.14.1"
    assert machine_of([{**env, "simd": None}]) == "CPU A / SIMD unknown / torch 2.14.1"
    older = {key: value for key, value in env.items() if key != "simd"}
    assert machine_of([older]) == "CPU A / SIMD not recorded / torch 2.14.1"
    runs = [RunResult("kta", seed, 0.5, 0.4, 1.0, 10.0, machine=machine_of(envs))
            for seed, envs in enumerate([[env], [env], [other], []])]
    assert machines_note(runs) == (
        "- runs by machine (CPU / widest SIMD / torch): 2 on CPU A / avx2 / torch 2.14.1; "
        "1 on CPU B / avx512f / torch 2.14.1; 1 not recorded (made before results.json kept it)\n")


def test_a_fleets_table_has_a_row_per_method_and_tier_averaged_over_seeds():
    def tier(acc: float, partitions: list[int], mib: float, seconds: float) -> dict:
        return {"model": "cnn", "partitions": partitions, "personalized-accuracy": acc,
                "global-accuracy": acc / 2, "bytes_up": int(mib * 2**20), "bytes_down": 0,
                "train_seconds_per_reply": seconds}

    runs = [RunResult("kta", seed, 0.5, 0.4, 1.0, 10.0,
                      tiers={"small": tier(0.6 + 0.2 * seed, [0, 3], 2.0, 1.0 + seed),
                             "large": tier(0.8, [1], 1.0, 9.0)}) for seed in (0, 1)]
    runs.append(RunResult("fedavg", 0, 0.5, 0.4, 1.0, 10.0))  # no fleet: no rows
    lines = tier_table(runs).splitlines()
    assert lines[2] == "| kta | small | cnn | 0.7000 ± 0.1414 | 0.3500 ± 0.0707 | 1.000 | 1.50 |"
    assert lines[3] == "| kta | large | cnn | 0.8000 ± 0.0000 | 0.4000 ± 0.0000 | 1.000 | 9.00 |"
    assert len(lines) == 4 and tier_table(runs[2:]) == ""


def test_the_table_adds_the_server_model_and_the_newcomers_where_runs_have_them():
    def run(method, seed, server=math.nan, newcomers=None):
        return RunResult(method, seed, 0.5, 0.25, 1.0, 10.0, final_server_global=server,
                         newcomers=newcomers or {})

    runs = [run("kta", 0, 0.40, {"1": 0.6, "2": 0.7}), run("kta", 1, 0.44, {"1": 0.8, "2": 0.9}),
            run("fedavg", 0, newcomers={"1": 0.5})]
    stats = aggregate(runs, 0.3)
    assert stats["kta"]["server_global"] == pytest.approx((0.42, 0.0282843), rel=1e-5)
    assert math.isnan(stats["fedavg"]["server_global"][0])  # none: no mean over nothing
    lines = markdown_table("digits", RunConfig(), stats, 0.3).splitlines()
    assert lines[0].startswith("| method | personalized acc. | global acc. | server model acc. | "
                               "newcomers after 1 | newcomers after 2 | total MiB |")
    assert lines[2].startswith("| kta | 0.5000 ± 0.0000 | 0.2500 ± 0.0000 | 0.4200 ± 0.0283 | "
                               "0.7000 ± 0.1414 | 0.8000 ± 0.1414 | 1.000")
    assert lines[3].startswith("| fedavg | 0.5000 ± 0.0000 | 0.2500 ± 0.0000 | — | 0.5000 ± 0.0000 | — |")
    assert all(line.count("|") == lines[0].count("|") for line in lines[:4])
    plain = markdown_table("digits", RunConfig(), aggregate([run("kta", 0)], 0.3), 0.3)
    assert "server model" not in plain and "newcomers" not in plain


def test_repeated_set_options_all_apply():
    from kta_flwr.tools import cli  # pylint: disable=import-outside-toplevel

    parser = cli.benchmark_parser("bench", None, "overrides")
    args = parser.parse_args(["--preset", "digits", "--set", "fleet=tiers3", "--set", "dirichlet-alpha=0.1", "seed=2"])
    assert cli.overrides(args.set) == {"fleet": "tiers3", "dirichlet-alpha": 0.1, "seed": 2}
    assert parser.parse_args(["--preset", "digits"]).set == []
