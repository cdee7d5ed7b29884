"""The cross-setting comparison reads bench summaries and judges the default fairly."""

import json

import pytest

from kta_flwr.tools import compare


def write_summary(folder, accuracies):
    folder.mkdir(parents=True)
    methods = {m: {"seeds": [0, 1], "personalized": [acc, 0.01], "global": [acc / 2, 0.0],
                   "mib_total": [1.5, 0.0]} for m, acc in accuracies.items()}
    runs = [{"method": m, "seed": seed, "final_personalized": acc + (0.01 if seed else -0.01)}
            for m, acc in accuracies.items() for seed in (0, 1)]
    (folder / "summary.json").write_text(json.dumps({"methods": methods, "runs": runs}))


def test_verdicts_and_average(tmp_path):
    write_summary(tmp_path / "a", {"kta": 0.50, "local": 0.505, "fedmd": 0.40})
    write_summary(tmp_path / "b", {"kta": 0.70, "local": 0.60, "fedmd": 0.72})
    write_summary(tmp_path / "c", {"kta": 0.30, "local": 0.35, "fedmd": 0.20})
    table = {name: compare.load_setting(tmp_path / name) for name in "abc"}
    found = {v.setting: v for v in compare.verdicts(table, "kta", ["local", "fedmd"], 1.0)}
    assert found["a"].best_method == "local" and found["a"].within_margin
    assert found["a"].gap_points == pytest.approx(-0.5)
    assert found["a"].paired_gaps == pytest.approx([-0.5, -0.5])
    assert found["b"].best_method == "fedmd" and not found["b"].within_margin
    assert found["c"].gap_points == pytest.approx(-5.0) and not found["c"].within_margin
    text = compare.markdown(table, list(found.values()), "kta", ["local", "fedmd"], 1.0)
    # kta 0.5, local 0.485, fedmd 0.44: kta is best on average although it misses b and c.
    assert "kta best on average: yes" in text
    assert text.count("**no**") == 2
    assert "server model" not in text

    # a summary whose kta has the server's global model: its accuracy beside kta's global
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    summary["methods"]["kta"]["server_global"] = [0.4125, 0.01]
    (tmp_path / "a" / "summary.json").write_text(json.dumps(summary))
    text = compare.markdown({"a": compare.load_setting(tmp_path / "a")}, [], "kta", ["local"], 1.0)
    assert "| kta | 0.5000 ± 0.0100 / 0.2500 (server model 0.4125) / 1.50 |" in text
    assert "| local | 0.5050 ± 0.0100 / 0.2525 / 1.50 |" in text


def test_cli_writes_files_and_rejects_a_missing_folder(tmp_path, capsys):
    write_summary(tmp_path / "a", {"kta": 0.5, "local": 0.4})
    assert compare.main([f"A={tmp_path / 'a'}",
                         "--out", str(tmp_path / "out"), "--against", "local"]) == 0
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "comparison.md", "comparison.json", "comparison.png"}
    assert compare.main([f"B={tmp_path / 'missing'}", "--out", str(tmp_path / "out")]) == 2
    assert "no summary.json" in capsys.readouterr().err


def test_pareto_front_keeps_the_methods_nothing_cheaper_beats():
    from kta_flwr.tools.bench import pareto_front

    points = {"local": (0.0, 0.48), "kta": (7.2, 0.44), "kta:int8": (1.0, 0.49),
              "fedavg": (47.3, 0.36), "fedkd": (2.9, 0.50), "tie": (2.9, 0.50)}
    # kta and fedavg are beaten by cheaper methods; equal points both stay on the front.
    assert pareto_front(points) == ["local", "kta:int8", "fedkd", "tie"]
    assert pareto_front({}) == []


def test_bench_reuses_only_finished_runs_of_the_same_config(tmp_path):
    from kta_flwr.config import RunConfig
    from kta_flwr.tools.bench import reusable_run

    cfg = RunConfig(num_server_rounds=3)
    folder = tmp_path / "20261130-000000-kta"
    folder.mkdir()
    results = folder / "results.json"
    results.write_text(json.dumps({"config": cfg.to_flwr(), "rounds": [{}, {}]}))
    assert reusable_run(tmp_path, cfg) is None  # cut short after 2 of 3 rounds
    results.write_text(json.dumps({"config": cfg.to_flwr(), "rounds": [{}, {}, {}]}))
    assert reusable_run(tmp_path, cfg) == results
    assert reusable_run(tmp_path, cfg.replace(seed=1)) is None  # another config
    # a run saved before 'label-share' existed ran without it (0), not with today's 0.1
    before = {k: v for k, v in cfg.to_flwr().items() if k != "label-share"}
    results.write_text(json.dumps({"config": before, "rounds": [{}, {}, {}]}))
    assert cfg.label_share == 0.1 and reusable_run(tmp_path, cfg) is None
    assert reusable_run(tmp_path, cfg.replace(label_share=0.0)) == results
