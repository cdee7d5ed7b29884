"""Efficiency benchmark: kta through the real Flower app against a plain PyTorch loop.

::

    python -m kta_flwr.tools.efficiency --preset emnist_letters --clients 10 \\
        --set max-train-size=30000 --scaling 10,50,100

1. **Ratio.** Runs kta through Flower (simulation engine, or SuperLink + SuperNodes with
   ``--engine deployment``) and times the whole run from a cold start (SuperLink start-up,
   ``flwr run``, Ray, every round, shutdown). Then runs :func:`plain_loop` in a fresh
   Python process: the same models, partitions, rounds, batch sizes and number of trained
   samples (stage 1, and stage 2's reference batches each paired with a private slice),
   the same reference predictions and evaluations, as one plain PyTorch loop without
   Flower. Reports samples/s of each and their ratio (end to end, and rounds only).
2. **Where the time goes**, from the clients' per-phase seconds (:mod:`kta_flwr.flower.timing`)
   and the run's timestamps: start-up, client data/setup, model state save/restore,
   training, prediction, evaluation, the server's market, and the rest of each round
   (Flower/Ray messaging, serialization, scheduling, idle device).
3. **Client scaling** (``--scaling 10,50,100``): seconds per round against the number of
   clients, with the clients' compute and the per-client overhead.

Writes ``<out>/efficiency/<preset>/efficiency.json``, ``efficiency.md`` and
``round_time_vs_clients.png`` (with ``--scaling``).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from kta_flwr.config import DATA_ROOT, RunConfig, parse_run_config
from kta_flwr.flower.results import host_environment
from kta_flwr.flower.timing import EVALUATE_PHASES, TRAIN_PHASES
from kta_flwr.tools import cli
from kta_flwr.tools.federation import LocalFederation
from kta_flwr.tools.memory import PeakRss
from kta_flwr.tools.paths import REPO_ROOT
from kta_flwr.tools.plots import figure, save_figure
from kta_flwr.tools.presets import load_preset


# --- the plain PyTorch baseline ---------------------------------------------------------
def plain_loop(cfg: RunConfig, num_clients: int) -> dict[str, Any]:
    """Train every client's model for ``cfg.num_server_rounds`` rounds in one process.

    Per round and client, as the ClientApp does: ``local-epochs`` of cross-entropy over
    the private data; from round 2 on, ``distill-epochs`` over the reference set with a
    private slice per batch (one private pass per epoch; KL toward soft targets built
    from the reference labels; the gradient clipped to ``distill-clip``); the model's
    reference logits; and, in the rounds the
    strategy evaluates, a forward pass over the test set (and the client's own test rows).
    Models stay in memory. Returns samples trained and seconds (of this function only;
    the caller times the whole process).
    """
    # pylint: disable=import-outside-toplevel,too-many-locals
    import torch
    import torch.nn.functional as F

    from kta_flwr.task.splits import load_client_data
    from kta_flwr.task.models import build_model
    from kta_flwr.task.training import inference_batch_size, resolve_device

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    start = time.perf_counter()
    clients = []
    for pid in range(num_clients):
        data = load_client_data(cfg, pid, num_clients)
        spec = data.splits.spec_for(cfg)
        model = build_model(cfg.model_for_partition(pid), spec, cfg.seed + pid).to(device)
        tensors = {
            name: (torch.as_tensor(part.x).to(device), torch.as_tensor(part.y).to(device))
            for name, part in (("train", data.train), ("ref", data.reference), ("test", data.test),
                               ("local", data.local_test))
            if part is not None
        }
        clients.append((model, tensors, spec.num_classes))
    setup = time.perf_counter() - start
    samples, bs, infer_bs = 0, cfg.batch_size, inference_batch_size(device)
    for rnd in range(1, cfg.num_server_rounds + 1):
        for model, t, num_classes in clients:
            x, y = t["train"]
            opt = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate,
                                  momentum=cfg.momentum, weight_decay=cfg.weight_decay)
            model.train()
            for _ in range(cfg.local_epochs):
                for idx in torch.randperm(len(y), device=device).split(bs):
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    samples += len(idx)
            xr, yr = t["ref"]
            if rnd > 1 and cfg.distill_epochs:
                soft = F.one_hot(yr, num_classes).float() * 0.9 + 0.1 / num_classes
                opt = torch.optim.SGD(model.parameters(), lr=cfg.distill_learning_rate,
                                      momentum=cfg.momentum, weight_decay=cfg.weight_decay)
                steps = -(-len(yr) // bs)
                for _ in range(cfg.distill_epochs):
                    order = torch.randperm(len(y), device=device)
                    if len(y) < steps:
                        order = order.repeat(-(-steps // len(y)))[:steps]
                    for idx, pick in zip(torch.randperm(len(yr), device=device).split(bs),
                                         torch.tensor_split(order, steps)):
                        log_p = F.log_softmax(model(xr[idx]) / cfg.temperature, dim=-1)
                        loss = F.kl_div(log_p, soft[idx], reduction="batchmean")
                        if cfg.private_ce_weight > 0 and len(y):
                            loss = loss + F.cross_entropy(model(x[pick]), y[pick])
                            samples += len(pick)
                        opt.zero_grad()
                        loss.backward()
                        if cfg.distill_clip > 0:
                            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.distill_clip)
                        opt.step()
                        samples += len(idx)
            model.eval()
            with torch.no_grad():  # reference logits, then the evaluation
                torch.cat([model(b) for b in xr.split(infer_bs)]).cpu()
                if cfg.evaluates_in(rnd):
                    for name in ("test", "local"):
                        if name in t:
                            xt, yt = t[name]
                            torch.cat([model(b) for b in xt.split(infer_bs)]).argmax(-1).eq(yt).float().mean().item()
    return {"samples": samples, "setup_seconds": setup,
            "loop_seconds": time.perf_counter() - start - setup,
            "torch_threads": torch.get_num_threads()}


def run_plain(cfg: RunConfig, num_clients: int) -> dict[str, Any]:
    """:func:`plain_loop` in a fresh Python process, timed from launch to exit."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "kta_flwr.tools.efficiency", "--plain-worker",
         json.dumps(cfg.to_flwr()), str(num_clients)],
        capture_output=True, text=True, check=False, cwd=REPO_ROOT,
    )
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"plain loop failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "wall_seconds": wall}


# --- the Flower run ------------------------------------------------------------------
def run_flower(cfg: RunConfig, num_clients: int, engine: str, out_dir: Path) -> dict[str, Any]:
    """``cfg`` through the real Flower app from a cold start; returns its results.json plus
    the outer wall clock, timestamps and the federation's peak memory (the SuperLink and
    every process under it: with the simulation engine, the ServerApp, Ray and its
    workers)."""
    run_dir = out_dir / "runs" / f"{cfg.strategy}-{engine}-{num_clients}c"
    cfg = cfg.replace(output_dir=str(run_dir.resolve()), min_nodes=num_clients,
                      model_dir=str((run_dir / "models").resolve()))
    started_at = time.time()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kta-eff-") as work, LocalFederation(
        Path(work), num_clients, simulation=engine == "simulation"
    ) as fed, PeakRss(lambda: [p.pid for p in fed.processes]) as rss:
        proc = fed.submit(REPO_ROOT, cfg.to_flwr(), timeout=24 * 3600)
        returned_at = time.time()
    wall = time.monotonic() - start
    found = sorted(run_dir.glob("*/results.json"))
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"Flower run failed (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    res = json.loads(found[-1].read_text())
    return {"results": res, "wall_seconds": wall, "launched_at": started_at,
            "returned_at": returned_at, "results_json": str(found[-1]),
            "federation_peak_rss_mib": rss.peak_mib}


def breakdown(flower: dict[str, Any]) -> dict[str, float]:
    """Seconds of a Flower run by where they went (see the module docstring).

    ``rounds`` is the ServerApp's time from its start to its end; the client phases are
    sums over clients, so with several clients training at once (deployment, or several
    Ray actors) they can exceed the wall time they happened in.
    """
    res = flower["results"]
    rows, summary = res["rounds"], res["summary"]

    def total(key: str) -> float:
        return float(sum(r.get(key, 0.0) for r in rows))

    market = float(sum(m.get("market-seconds", 0.0) for m in res.get("train_metrics", {}).values()))
    parts = {
        "start-up (SuperLink, flwr run, ServerApp start, server data loading)":
            summary["started_at"] - flower["launched_at"],
        "client setup (config, data loading, cached per process)":
            total("train_s_setup") + total("eval_s_setup"),
        "client model state (restore, save to node state and disk)":
            total("train_s_restore") + total("train_s_save") + total("eval_s_restore")
            + total("eval_s_save"),
        "client training (stage 1)": total("train_s_stage1"),
        "client training (stage 2, distillation)": total("train_s_stage2"),
        "client reference logits": total("train_s_predict"),
        "client evaluation": total("eval_s_evaluate"),
        "server market": market,
    }
    in_rounds = sum(v for k, v in parts.items() if not k.startswith("start-up"))
    parts["rest of rounds (Flower/Ray messaging, serialization, scheduling, idle)"] = (
        summary["seconds"] - in_rounds
    )
    parts["run end (ServerApp end to `flwr run` return)"] = (
        flower["returned_at"] - summary["finished_at"]
    )
    parts["federation stop (SuperLink shutdown)"] = (
        flower["launched_at"] + flower["wall_seconds"] - flower["returned_at"]
    )
    return parts


def round_seconds(res: dict[str, Any]) -> list[float]:
    """Wall seconds of each round (round 1 from the ServerApp's start)."""
    marks = [0.0] + [r["seconds"] for r in res["rounds"]]
    return [b - a for a, b in zip(marks, marks[1:])]


def client_seconds(row: dict[str, Any]) -> float:
    """Sum over clients of their train and evaluate phases in one round row."""
    return sum(row.get(f"train_s_{p}", 0.0) for p in TRAIN_PHASES) + sum(
        row.get(f"eval_s_{p}", 0.0) for p in EVALUATE_PHASES
    )


def scaling_point(flower: dict[str, Any], num_clients: int) -> dict[str, Any]:
    """Round time and its split for one client count (rounds after the first, which
    also starts Ray and loads each client's data)."""
    res = flower["results"]
    secs = round_seconds(res)
    later = list(zip(secs[1:], res["rounds"][1:])) or list(zip(secs, res["rounds"]))
    mean_round = statistics.fmean(s for s, _ in later)
    compute = statistics.fmean(client_seconds(r) for _, r in later)
    return {
        "clients": num_clients,
        "first_round_seconds": secs[0],
        "round_seconds": mean_round,
        "client_seconds_per_round": compute,
        "overhead_seconds_per_round": mean_round - compute,
        "overhead_ms_per_client": 1000 * (mean_round - compute) / num_clients,
        "samples_per_round": statistics.fmean(r["samples"] for _, r in later),
        "wall_seconds": flower["wall_seconds"],
    }


# --- report --------------------------------------------------------------------------
def hardware() -> str:
    """``"<CPU model> (<widest SIMD>), <n> CPUs, <GPU or no GPU>"``: timings depend on the
    SIMD too (the market's float32 logarithms run much faster with AVX-512)."""
    import torch  # pylint: disable=import-outside-toplevel

    host = host_environment()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{host['cpu']} ({host['simd'] or 'SIMD unknown'}), {host['cpu_count']} CPUs, {gpu}"


def markdown(report: dict[str, Any]) -> str:
    """The efficiency tables."""
    ratio, lines = report["ratio"], []
    if ratio:
        lines += [
            f"Preset `{report['preset']}`, {report['clients']} clients, engine {report['engine']}, "
            f"{report['hardware']}, {report['date']}.",
            "",
            "| | samples | wall s | samples/s |",
            "|---|---|---|---|",
            f"| kta through Flower (whole run, cold start) | {ratio['flower_samples']:,} | "
            f"{ratio['flower_wall']:.1f} | {ratio['flower_rate']:.0f} |",
            f"| plain PyTorch loop (whole process) | {ratio['plain_samples']:,} | "
            f"{ratio['plain_wall']:.1f} | {ratio['plain_rate']:.0f} |",
            f"| **ratio, end to end** | | | **{ratio['end_to_end']:.3f}** |",
            f"| ratio, rounds only (ServerApp rounds vs plain loop) | | | {ratio['rounds_only']:.3f} |",
            "",
            "| where the Flower run's time went | seconds | share |",
            "|---|---|---|",
        ]
        wall = ratio["flower_wall"]
        lines += [f"| {k} | {v:.2f} | {100 * v / wall:.1f}% |" for k, v in report["breakdown"].items()]
    if report["scaling"]:
        lines += [
            "",
            f"Client scaling (`{report['scaling_preset']}`, {report['engine']}):",
            "",
            "| clients | s / round | client s / round | overhead s / round | overhead ms / client | samples / round | first round s |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {p['clients']} | {p['round_seconds']:.2f} | {p['client_seconds_per_round']:.2f} "
            f"| {p['overhead_seconds_per_round']:.2f} | {p['overhead_ms_per_client']:.1f} "
            f"| {p['samples_per_round']:,.0f} | {p['first_round_seconds']:.1f} |"
            for p in report["scaling"]
        ]
    return "\n".join(lines) + "\n"


def plot_scaling(points: list[dict[str, Any]], path: Path, title: str) -> None:
    """Seconds per round against clients: total, client compute, and the rest."""
    clients = [p["clients"] for p in points]
    fig, ax = figure((6, 4))
    ax.plot(clients, [p["round_seconds"] for p in points], marker="o", label="round (wall)")
    ax.plot(clients, [p["client_seconds_per_round"] for p in points], marker="s",
            label="client phases (sum over clients)")
    ax.plot(clients, [p["overhead_seconds_per_round"] for p in points], marker="^",
            label="rest: Flower/Ray, idle")
    ax.set_xlabel("clients (simulated SuperNodes)")
    ax.set_ylabel("seconds per round")
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=9)
    ax.set_ylim(bottom=0)
    save_figure(fig, ax, path)


def run_efficiency(  # pylint: disable=too-many-arguments,too-many-locals
    preset: str,
    clients: int,
    out_dir: Path,
    overrides: dict[str, Any] | None = None,
    engine: str = "simulation",
    scaling: list[int] | None = None,
    scaling_overrides: dict[str, Any] | None = None,
    data_root: Path | None = None,
    skip_ratio: bool = False,
) -> dict[str, Any]:
    """Ratio, breakdown and (optionally) client scaling; writes the report files."""

    def config(extra: dict[str, Any] | None) -> RunConfig:
        # A fixed workload on both sides: no gate and no held-out rows, so every client
        # distills on every reference row in every round after the first, as the plain
        # loop does.
        fixed = {"strategy": "kta", "distill-gate": False, "holdout-fraction": 0.0}
        cfg = load_preset(preset, {**fixed, **(extra or {})})
        return cfg.rooted(data_root or DATA_ROOT)

    base = config(overrides)
    sbase = config(scaling_overrides)  # the preset + --scaling-set, not --set
    name = Path(preset).stem
    results_dir = out_dir / "efficiency" / name
    results_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "preset": name, "clients": clients, "engine": engine, "hardware": hardware(),
        "date": time.strftime("%Y-%m-%d"), "config": base.to_flwr(), "ratio": {},
        "breakdown": {}, "scaling": [], "scaling_preset": "",
    }
    previous = results_dir / "efficiency.json"
    if skip_ratio and previous.is_file():  # keep the last ratio measurement of this preset
        old = json.loads(previous.read_text())
        report.update({k: old[k] for k in ("ratio", "breakdown", "config", "clients", "date")})
    if not skip_ratio:
        print(f"[efficiency] kta through Flower ({engine}), {clients} clients ...", flush=True)
        flower = run_flower(base, clients, engine, results_dir)
        print(f"[efficiency] Flower run: {flower['wall_seconds']:.1f} s; plain PyTorch loop ...", flush=True)
        plain = run_plain(base, clients)
        res = flower["results"]
        samples = res["summary"]["samples"]
        if samples != plain["samples"]:
            raise RuntimeError(f"sample counts differ: Flower {samples}, plain loop {plain['samples']}")
        report["ratio"] = {
            "flower_samples": samples, "flower_wall": flower["wall_seconds"],
            "flower_rate": samples / flower["wall_seconds"],
            "plain_samples": plain["samples"], "plain_wall": plain["wall_seconds"],
            "plain_rate": plain["samples"] / plain["wall_seconds"],
            "end_to_end": plain["wall_seconds"] / flower["wall_seconds"],
            "rounds_only": plain["loop_seconds"] / res["summary"]["seconds"],
            "plain": plain, "flower_results_json": flower["results_json"],
        }
        report["breakdown"] = breakdown(flower)
    if scaling:
        report["scaling_preset"] = name + "".join(f" {k}={v}" for k, v in (scaling_overrides or {}).items())
        for num in scaling:
            print(f"[efficiency] scaling: {num} clients ...", flush=True)
            point = scaling_point(run_flower(sbase, num, engine, results_dir), num)
            report["scaling"].append(point)
            print(f"[efficiency] {num} clients: {point['round_seconds']:.2f} s/round "
                  f"({point['client_seconds_per_round']:.2f} s in clients)", flush=True)
        plot_scaling(report["scaling"], results_dir / "round_time_vs_clients.png",
                     f"Round time vs clients: {report['scaling_preset']}, {engine}")
    (results_dir / "efficiency.json").write_text(json.dumps(report, indent=2, default=str))
    table = markdown(report)
    (results_dir / "efficiency.md").write_text(table)
    print(table)
    print(f"[efficiency] wrote {results_dir}")
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--plain-worker"]:  # internal: the baseline's own process
        cfg = parse_run_config(json.loads(argv[1]))
        print(json.dumps(plain_loop(cfg, int(argv[2]))))
        return 0
    parser = cli.benchmark_parser("python -m kta_flwr.tools.efficiency", __doc__,
                                  "run-config overrides for the ratio run")
    parser.add_argument("--scaling", default="", help="client counts, e.g. 10,50,100")
    parser.add_argument("--scaling-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="run-config overrides for the scaling runs (on the preset, not --set)")
    parser.add_argument("--skip-ratio", action="store_true",
                        help="only the scaling runs (the report keeps the last ratio measured)")
    return cli.run_benchmark_cli(parser, argv, lambda args, data_root: run_efficiency(
        args.preset, args.clients, args.out, cli.overrides(args.set), args.engine,
        [int(n) for n in args.scaling.split(",") if n.strip()],
        cli.overrides(args.scaling_set), data_root, args.skip_ratio,
    ))


if __name__ == "__main__":
    sys.exit(main())
