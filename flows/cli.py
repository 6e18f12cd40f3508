"""The `incompat` command line.

Exit codes: 0 ok, 1 failure (bad data, failed run), 2 usage. Errors go to stderr as one readable line; `--debug`
shows the traceback. `--json` prints a machine-readable result on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    pass


def _print_result(args, result: dict, lines: list[str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    elif not getattr(args, "quiet", False):
        for line in lines:
            print(line)


def _parse_size(text: str | None):
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--image-size must look like 32x32, got {text!r}") from None
    return (h, w)


def cmd_ingest(args) -> int:
    from incompat.readers import ingest

    out = Path(args.out)
    summary = ingest(args.source, out, fmt=args.format, subset=args.subset, seed=args.seed,
                     image_size=_parse_size(args.image_size), on_bad_sample=args.on_bad_sample,
                     quarantine_path=out.with_suffix(".quarantine.json"), split=args.split)
    _print_result(args, {**summary, "out": str(out)}, [
        f"ingested {summary['n_samples']} samples, {summary['n_classes']} classes ({summary['format']})",
        f"dataset digest {summary['dataset_digest']}",
        f"wrote {out}",
    ])
    return EXIT_OK


def cmd_scenarios(args) -> int:
    from incompat.attacks import paper_scenario_table

    table = paper_scenario_table(args.paper_seed)
    if args.json:
        print(json.dumps(table))
        return EXIT_OK
    print(f"{'id':>3} {'src':>3} {'tgt':>3} {'kind':8} {'position':10} {'color':15} rate")
    for row in table:
        print(f"{row['id']:>3} {row['source']:>3} {row['target']:>3} {row['kind']:8} "
              f"{str(tuple(row['position'])):10} {str(tuple(row['color'])):15} {row['rate']}")
    return EXIT_OK


def cmd_poison(args) -> int:
    from incompat.poisoning import write_poisoned

    summary = write_poisoned(args.dataset, args.scenario, args.out, test_path=args.test)
    _print_result(args, summary, [
        f"scenario {summary['scenario']}: poisoned {summary['n_poison']} of {summary['n_samples']} samples",
        *(f"wrote {p}" for p in summary["files"]),
    ])
    return EXIT_OK


def _overrides(pairs: list[str]) -> dict:
    from incompat.config import ConfigError, parse_overrides

    try:
        return parse_overrides(pairs)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _check_params(args) -> None:
    """The parameter file and every --set, checked before Prefect, MLflow or a server starts: a typo costs a
    second, not a server start, and the error (a ConfigError: one line, exit 1) names the key or the flag."""
    from incompat.config import load_params

    load_params(args.params, profile=getattr(args, "profile", None),
                defense_overrides=_overrides(getattr(args, "set", None) or []))


class _VersionAction(argparse.Action):
    """`--version`: the package version, and the git commit when run from a checkout (looked up only when asked)."""

    def __call__(self, parser, namespace, values, option_string=None):
        import subprocess

        from incompat import __version__

        text = f"incompat {__version__}"
        root = Path(__file__).resolve().parent.parent
        if (root / ".git").exists():
            try:
                commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                                        capture_output=True, text=True, timeout=5)
                if commit.returncode == 0 and commit.stdout.strip():
                    text += f" (git {commit.stdout.strip()})"
            except (OSError, subprocess.SubprocessError):
                pass
        print(text)
        parser.exit()


def _flows(args) -> None:
    """Prefect's settings must be in place before Prefect is first imported; the servers the run needs are asked
    whether they answer before any work starts; from here on SIGINT / SIGTERM stop the run cleanly."""
    _check_params(args)
    from tasks import endpoints, lifecycle
    from tasks.runtime import configure
    from tasks.tracking import tracking_uri

    configure(verbose=args.debug)
    endpoints.check_all(tracking_uri())
    lifecycle.install(args.command)
    if not args.debug:
        import warnings

        warnings.filterwarnings("ignore", module=r"mlflow\..*")
        logging.getLogger("mlflow").setLevel(logging.ERROR)
        logging.getLogger("alembic").setLevel(logging.ERROR)
        logging.getLogger("distributed").setLevel(logging.ERROR)


def _progress(args) -> bool:
    """Progress unless asked for quiet output: a bar on a terminal, else a line every so often (DVC, nohup, a
    Prefect worker: see incompat/progress.py)."""
    return not args.quiet and not args.json


def _where(result: dict) -> list[str]:
    paths = result.get("paths", {})
    lines = [f"cleaned dataset: {paths.get('clean')}", f"removed samples: {paths.get('removed')}",
             f"lineage:         {paths.get('lineage')}", f"report:          {paths.get('report')}"]
    if paths.get("evaluation"):
        lines.append(f"evaluation:      {paths['evaluation']}")
    lines.append(f"MLflow run:      {result.get('mlflow_run_id')} ({result.get('tracking_uri')}; "
                 f"`mlflow ui --backend-store-uri {result.get('tracking_uri')}`)")
    lines.append(f"Prefect run:     {result.get('prefect_flow_run_id')}")
    return lines


def _counts_line(m: dict, cached: bool = False) -> str:
    """`cached`: the clustering was served from Prefect's cache, so its wall time is the first run's."""
    cost = (f"defense served from cache (first run {m.get('wall_seconds', 0):.0f} s)" if cached
            else f"defense {m.get('wall_seconds', 0):.0f} s")
    line = (f"removed {m['n_removed']} of {m['n_samples']} samples ({100 * m['removed_fraction']:.2f}%); "
            f"{cost}, {m.get('epoch_equivalents', 0):.1f} epoch-equivalents")
    if "poison_total" in m:
        line += (f"; poison removed {m['poison_removed']}/{m['poison_total']}, "
                 f"clean removed {m['clean_removed']}/{m['clean_total']}")
    return line


def cmd_sanitize(args) -> int:
    _flows(args)
    from flows.sanitize import sanitize

    result = sanitize(dataset=args.dataset, out=args.out, incoming=args.incoming, versioned=args.versioned,
                      params_path=args.params, profile=args.profile, overrides=_overrides(args.set),
                      truth=args.truth, experiment=args.experiment, progress=_progress(args),
                      skip_when_no_incoming=args.skip_when_no_incoming)
    if result["status"] != "sanitized":
        _print_result(args, result, [f"{result['status']}: {result.get('incoming')}"])
        return EXIT_OK
    m = result["filter"]
    cached = bool(result["cluster"].get("cached"))
    lines = [_counts_line(m, cached)]
    if result.get("version"):
        lines.append(f"version:         {result['version']} (named in {Path(args.out) / 'LATEST'})")
    _print_result(args, {**m, "cached": cached, "paths": result["paths"], "version": result["version"],
                         "mlflow_run_id": result["mlflow_run_id"],
                         "prefect_flow_run_id": result["prefect_flow_run_id"]}, lines + _where(result))
    return EXIT_OK


def cmd_evaluate(args) -> int:
    _flows(args)
    from flows.evaluate import evaluate

    echo = (lambda *_: None) if (args.quiet or args.json) else print
    echo(f"evaluate: {args.scenario or 'scenario of ' + args.params} on {args.data_dir}/ "
         f"(Prefect flow; steps already done with the same inputs are served from cache)")
    result = evaluate(params_path=args.params, data_dir=args.data_dir, profile=args.profile,
                      overrides=_overrides(args.set), scenario=args.scenario, experiment=args.experiment,
                      progress=_progress(args), retrain=not args.no_retrain)
    lines = [_counts_line(result["filter"], bool(result["cluster"].get("cached")))]
    ev = result.get("evaluation")
    if ev:
        lines.append(f"clean accuracy {ev['clean_accuracy_before']:.4f} -> {ev['clean_accuracy_after']:.4f}; "
                     f"attack success {ev['attack_success_rate_before']:.4f} -> "
                     f"{ev['attack_success_rate_after']:.4f}; targeted misclassification "
                     f"{ev['targeted_misclassification_before']:.4f} -> {ev['targeted_misclassification_after']:.4f}")
    summary = {"sanitize": {k: v for k, v in result["filter"].items() if k != "outputs"},
               "evaluation": {k: v for k, v in (ev or {}).items() if k != "outputs"},
               "paths": result["paths"], "mlflow_run_id": result["mlflow_run_id"],
               "prefect_flow_run_id": result["prefect_flow_run_id"]}
    _print_result(args, summary, lines + _where(result))
    return EXIT_OK


def cmd_lineage(args) -> int:
    from incompat import lineage

    check = lineage.verify(args.path, roots=args.root)
    record = check.contents  # the record verify read and checked (every key read below is there)
    if check.authenticated:
        scope = (f"integrity and authenticity: the record's HMAC under ${lineage.KEY_ENV} matches, its digests "
                 "match the files it names, and its datasets carry its content digest")
    else:
        scope = ("integrity and internal consistency only, not authenticity: the record's digests match the files "
                 "it names and its datasets carry its content digest, but whoever can rewrite the data and the "
                 f"record together can make them agree (set ${lineage.KEY_ENV} when writing and checking to sign)")
    if args.json:
        print(json.dumps({"record": str(check.record), "ok": check.ok, "verified": scope,
                          "authenticated": check.authenticated, "roots": [str(r) for r in check.roots],
                          "checks": [c.__dict__ for c in check.checks],
                          "record_digest": record.get("record_digest"),
                          "mlflow_run_id": record.get("mlflow_run_id"),
                          "prefect_flow_run_id": record.get("prefect_flow_run_id")}, indent=2))
    elif not args.quiet:
        code = record.get("code", {})
        print(f"lineage of {check.record.parent} (recorded {record.get('created')}; "
              f"record digest {record['record_digest'][:12]}...)")
        for line in lineage.describe(record):
            print("  " + line)
        if record.get("scenario"):
            print(f"  scenario: {record['scenario'].get('name')}")
        print(f"  params: profile {record['params'].get('profile')}; code {code.get('package')} "
              f"git {str(code.get('git_commit'))[:12]}{' (dirty)' if code.get('git_dirty') else ''} "
              f"engine {str(code.get('engine_sha256'))[:12]}")
        print(f"  MLflow run {record.get('mlflow_run_id')}; Prefect flow run {record.get('prefect_flow_run_id')}")
        print(f"  removed per class: {record.get('removed_per_class')}")
        for c in check.checks:
            print(f"  [{c.status:>9}] {c.role}: {c.path}" + (f" - {c.detail}" if c.detail else ""))
        print(f"  verified: {scope}" if check.ok else "  NOT verified: see the failures above")
    if not check.ok:
        bad = check.changed
        print(f"incompat lineage: error: {len(bad)} check(s) failed (changed after the fact, missing or unreadable): "
              + "; ".join(f"{c.role}: {c.path} ({c.detail or c.status})" for c in bad), file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_report(args) -> int:
    from incompat.report import ReportSources, write_report

    sources = ReportSources.discover(args.run_dir)
    if args.truth:
        sources.truth = Path(args.truth)
    out = Path(args.out) if args.out else Path(args.run_dir)
    paths = write_report(sources, out, top_k=args.top_k)
    lines = [f"report: {paths['html']}"]
    if sources.truth is not None:
        lines = [f"{name}: {c['poison_shown']} of the {c['shown']} most suspicious are truly poison"
                 for name, c in paths["suspicious"].items() if c["poison_shown"]] + lines
    _print_result(args, {"html": str(paths["html"]), "figures": [str(p) for p in paths.get("figures", [])],
                         "suspicious": paths["suspicious"]}, lines)
    return EXIT_OK


def cmd_step(args) -> int:
    """One pipeline step on the pipeline layout, for DVC stages (dvc.yaml): the same code the flows' tasks run."""
    from incompat import steps
    from incompat.config import load_params

    params = load_params(args.params)
    layout = steps.Layout(args.data_dir)
    progress = _progress(args)
    name = args.name
    if name == "ingest":
        result = steps.run_ingest(layout, params.ingest)
    elif name == "poison":
        result = steps.run_poison(layout, params.poison.scenario)
    elif name == "cluster":
        result = steps.run_cluster(layout, params, progress=progress)
    elif name == "filter":
        result = steps.run_filter(layout, params, run_context={"dvc_stage": "filter"})
    elif name == "retrain":
        result = steps.run_retrain(layout, params, progress=progress)
    elif name == "evaluate":
        result = steps.run_evaluate(layout, params)
    else:
        result = steps.run_report(layout, Path(args.params))
    result = {k: v for k, v in result.items() if k != "outputs"}
    _print_result(args, result, [f"{name}: done"])
    return EXIT_OK


def _scenario_ids(text: str | None) -> list[int] | None:
    if text is None:
        return None
    ids: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            ids += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UsageError(f"--ids must look like 0-23 or 1,4,7, got {text!r}") from None
    return ids


def cmd_grid(args) -> int:
    """Defaults from params.yaml's `grid` group; a command-line option overrides it."""
    _flows(args)
    from flows.grid import run_grid
    from incompat.config import load_params

    g = load_params(args.params).grid
    scenarios = args.scenario or (None if args.paper_seed or args.ids else g.scenarios)
    result = run_grid(workers=args.workers or g.workers, dask_address=args.dask_address,
                      memory_limit=args.memory_limit or g.memory_limit, scenarios=scenarios,
                      paper_seed=args.paper_seed or g.paper_seed, ids=_scenario_ids(args.ids or g.ids),
                      out=args.out or g.out, params_path=args.params, retrain=g.retrain and not args.no_retrain,
                      experiment=args.experiment)
    lines = [f"{len(result['rows'])} scenarios", f"table: {result['csv']} and {result['markdown']}",
             f"MLflow run: {result['mlflow_run_id']}"]
    _print_result(args, result, lines)
    return EXIT_OK


def cmd_pipeline(args) -> int:
    return cmd_evaluate(args)


EXAMPLES = {
    "ingest": """
        incompat ingest ../shared/data/cifar10/train.parquet --out data/raw/train.parquet
        incompat ingest ./GTSRB --image-size 32x32 --out data/raw/gtsrb.parquet
        incompat ingest cifar-10-batches-py --split test --out data/raw/test.parquet --subset 2000""",
    "scenarios": """
        incompat scenarios --paper-seed 100
        incompat scenarios --paper-seed 1000 --json""",
    "poison": """
        incompat poison data/raw/train.parquet --scenario paper:100:2 --out data/poisoned --test data/raw/test.parquet
        incompat poison data/raw/train.parquet --scenario my_attack.yaml --out data/poisoned""",
    "sanitize": """
        incompat sanitize data/poisoned/train.parquet --out runs/s1
        incompat sanitize data/poisoned/train.parquet --out runs/s1 --truth data/poisoned/truth.parquet
        incompat sanitize base.parquet --incoming incoming/ --out sanitized/ --versioned
        incompat sanitize data.parquet --out runs/s2 --profile paper --set boost=4""",
    "evaluate": """
        incompat evaluate                      # params.yaml: CIFAR-10 subset, paper:100:2, cpu profile
        incompat evaluate --scenario paper:100:15 --data-dir runs/s100-15
        incompat evaluate --set boost=6 --no-retrain""",
    "pipeline": """
        incompat pipeline                      # = incompat evaluate on params.yaml (what `make run` runs)""",
    "grid": """
        incompat grid --paper-seed 100 --ids 0-23 --workers 2
        incompat grid --scenario paper:100:2 --scenario my_attack.yaml --no-retrain
        incompat grid --dask-address tcp://scheduler:8786 --out /shared/grid""",
    "lineage": """
        incompat lineage data/clean/clean.parquet
        incompat lineage sanitized/v-3f2a9c1e0b7d/lineage.json --json""",
    "report": """
        incompat report runs/s1
        incompat report data --out /tmp/report
        incompat report runs/s1 --truth data/poisoned/truth.parquet   # frame the true poisons, count them""",
    "step": """
        incompat step cluster                  # what `dvc repro` runs for the cluster stage""",
}


PARAMS_HELP = "the parameter file (default params.yaml); a missing file is an error, not the built-in defaults"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    common.add_argument("--quiet", action="store_true", help="no progress bars or summaries")
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")

    parser = argparse.ArgumentParser(prog="incompat", description="Find and remove backdoor-poisoned training "
                                     "samples by incompatibility clustering (ISPL+B).", parents=[common])
    parser.add_argument("--version", action=_VersionAction, nargs=0,
                        help="print the version (and the git commit of a checkout) and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, help_text, func):
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common],
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="examples:" + textwrap.dedent(EXAMPLES.get(name, "")))
        p.set_defaults(func=func)
        return p

    p = add("ingest", "read a dataset (HF parquet, image folder, GTSRB, CIFAR batches, npz) into the canonical "
            "format", cmd_ingest)
    p.add_argument("source")
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="auto",
                   choices=["auto", "hf-parquet", "canonical", "image-folder", "gtsrb", "cifar-batches", "npz"])
    p.add_argument("--split", choices=["train", "test"], default=None,
                   help="for GTSRB and CIFAR batches: which split (default train)")
    p.add_argument("--subset", type=int, default=None, help="stratified random subset of N samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", default=None, help="resize every image to HxW (e.g. 32x32)")
    p.add_argument("--on-bad-sample", choices=["fail", "skip"], default="fail")

    p = add("scenarios", "list the paper's 24 backdoor scenarios for a seed", cmd_scenarios)
    p.add_argument("--paper-seed", type=int, required=True, choices=[100, 1000, 10000])

    p = add("poison", "plant a backdoor (for evaluating the defense)", cmd_poison)
    p.add_argument("dataset")
    p.add_argument("--scenario", required=True, help="paper:<seed>:<id> or a scenario YAML file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--test", default=None, help="a test set: also write test_triggered.parquet")

    def add_params(p, data_dir=False):
        p.add_argument("--params", default="params.yaml", help=PARAMS_HELP)
        p.add_argument("--profile", default=None, help="defense profile from params.yaml (default: defense.profile)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a defense parameter, e.g. --set boost=4 --set learner_train.epochs=2")
        p.add_argument("--experiment", default="incompat", help="MLflow experiment (MLFLOW_TRACKING_URI: store)")

    p = add("sanitize", "run ISPL+B on a dataset (plus incoming batches) and split it into kept and removed "
            "samples (Prefect flow, MLflow run)", cmd_sanitize)
    p.add_argument("dataset", help="the base dataset (any format `incompat ingest` reads)")
    p.add_argument("--out", required=True, help="output folder (with --versioned: the folder of versions)")
    p.add_argument("--incoming", default=None, help="a new batch, or a folder of batches, to merge in")
    p.add_argument("--versioned", action="store_true",
                   help="write OUT/v-<key>/ per distinct input+parameters and point OUT/LATEST at it")
    p.add_argument("--skip-when-no-incoming", action="store_true",
                   help="with --incoming: do nothing (exit 0) when it holds no batch")
    p.add_argument("--truth", default=None, help="ground truth (truth.parquet) for detection metrics only")
    add_params(p)

    for name, text in (("evaluate", "one scenario end to end: ingest, poison, cluster, filter, retrain, "
                                    "evaluate, report (Prefect flow, MLflow run)"),
                       ("pipeline", "the default pipeline of params.yaml (= evaluate)")):
        p = add(name, text, cmd_evaluate if name == "evaluate" else cmd_pipeline)
        p.add_argument("--data-dir", default="data")
        p.add_argument("--scenario", default=None, help="paper:<seed>:<id> or a YAML file (default: params.yaml)")
        p.add_argument("--no-retrain", action="store_true", help="stop after the report of the sanitization")
        add_params(p)

    p = add("grid", "many scenarios end to end, on Dask when asked, gathered into one table (defaults: the "
            "`grid` group of params.yaml)", cmd_grid)
    p.add_argument("--scenario", action="append", default=[], help="a scenario spec (repeatable); default: the "
                   "paper's grid")
    p.add_argument("--paper-seed", type=int, default=None, choices=[100, 1000, 10000])
    p.add_argument("--ids", default=None, help="paper scenario ids, e.g. 0-23 or 2,15")
    p.add_argument("--out", default=None)
    p.add_argument("--workers", type=int, default=None, help="local Dask cluster of N worker processes (1: no Dask)")
    p.add_argument("--dask-address", default=None, help="an existing Dask scheduler, e.g. tcp://host:8786")
    p.add_argument("--memory-limit", default=None, help="per local Dask worker")
    p.add_argument("--no-retrain", action="store_true", help="sanitize only (no before/after retraining)")
    p.add_argument("--params", default="params.yaml", help=PARAMS_HELP)
    p.add_argument("--experiment", default="incompat")

    p = add("lineage", "print where a cleaned dataset came from and verify every digest on the way",
            cmd_lineage)
    p.add_argument("path", help="lineage.json, its folder, or the cleaned dataset beside it")
    p.add_argument("--root", action="append", default=[], metavar="DIR",
                   help="another folder the record's sources may be read from (default: the record's folder and "
                        "the project holding it); repeatable")

    p = add("report", "write the HTML report of a sanitization run folder", cmd_report)
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="where to write report.html (default: the run folder)")
    p.add_argument("--top-k", type=int, default=16, help="most suspicious samples shown per class")
    p.add_argument("--truth", help="ground truth (truth.parquet) to show detection against; default: a "
                                   "truth.parquet in the run folder, if any")

    p = add("step", "run one pipeline step on the data/ layout (used by dvc.yaml)", cmd_step)
    p.add_argument("name", choices=["ingest", "poison", "cluster", "filter", "retrain", "evaluate", "report"])
    p.add_argument("--params", default="params.yaml", help=PARAMS_HELP)
    p.add_argument("--data-dir", default="data")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if not args.debug:
        # Prefect's run logs propagate to this handler: they belong in Prefect's UI (tasks/runtime.py sends them
        # there); the console gets warnings, ours among them, and the CLI's own one-line result or error
        console.setLevel(logging.WARNING)
        console.addFilter(lambda record: not record.name.startswith(("prefect", "uvicorn", "fastapi")))
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, handlers=[console])
    from incompat.data import DataError
    from incompat.files import OutputError
    from tasks import lifecycle

    try:
        try:
            code = args.func(args)
        except BaseException:
            if lifecycle.stop_requested():  # whatever the signal made Prefect or MLflow raise: one line, exit
                lifecycle.stop_now()
            raise
        if lifecycle.stop_requested():
            lifecycle.stop_now()
        return code
    except UsageError as exc:
        print(f"incompat {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `incompat ... | head` is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (DataError, OutputError, ValueError, OSError, RuntimeError) as exc:
        if args.debug:
            raise
        print(f"incompat {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"incompat {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        lifecycle.uninstall()


if __name__ == "__main__":
    sys.exit(main())
