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


def cmd_sanitize(args) -> int:
    from incompat.config import load_params
    from incompat.data import read_dataset
    from incompat.sanitize import read_truth, sanitize

    params = load_params(args.params, profile=args.profile, defense_overrides=_overrides(args.set))
    dataset = read_dataset(args.dataset)
    truth = read_truth(args.truth, dataset) if args.truth else None
    progress = not args.quiet and sys.stderr.isatty()
    _, outputs = sanitize(dataset, params.defense, args.out, truth_mask=truth, progress=progress,
                          extra_metrics={"profile": params.profile})
    m = outputs.metrics_values
    lines = [f"removed {m['n_removed']} of {m['n_samples']} samples ({100 * m['removed_fraction']:.2f}%) "
             f"in {m['wall_seconds']:.0f} s, {m['epoch_equivalents']:.1f} epoch-equivalents"]
    if truth is not None:
        lines.append(f"poison removed {m['poison_removed']}/{m['poison_total']}, "
                     f"clean removed {m['clean_removed']}/{m['clean_total']}")
    lines += [f"wrote {p}" for p in (outputs.clean, outputs.removed, outputs.scores, outputs.metrics)]
    _print_result(args, {**m, "files": [str(p) for p in (outputs.clean, outputs.removed, outputs.scores,
                                                          outputs.metrics)]}, lines)
    return EXIT_OK


def cmd_pipeline(args) -> int:
    from flows.pipeline import run_all
    from incompat.config import load_params

    params = load_params(args.params, profile=args.profile, defense_overrides=_overrides(args.set))
    progress = not args.quiet and sys.stderr.isatty()
    result = run_all(params, Path(args.data_dir), progress=progress,
                     echo=(lambda *_: None) if (args.quiet or args.json) else print)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return EXIT_OK


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
        incompat sanitize data.parquet --out runs/s2 --profile paper --set boost=4""",
    "pipeline": """
        incompat pipeline                      # params.yaml: CIFAR-10 subset, paper:100:2, cpu profile
        incompat pipeline --set boost=6 --data-dir /tmp/run1""",
}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    common.add_argument("--quiet", action="store_true", help="no progress bars or summaries")
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")

    parser = argparse.ArgumentParser(prog="incompat", description="Find and remove backdoor-poisoned training "
                                     "samples by incompatibility clustering (ISPL+B).", parents=[common])
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

    p = add("sanitize", "run ISPL+B and split a dataset into kept and removed samples", cmd_sanitize)
    p.add_argument("dataset")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--truth", default=None, help="ground truth (truth.parquet) for detection metrics only")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--profile", default=None, help="defense profile from params.yaml (default: defense.profile)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a defense parameter, e.g. --set boost=4 --set learner_train.epochs=2")
    p = add("pipeline", "run the default pipeline of params.yaml: ingest, poison, sanitize, retrain, evaluate",
            cmd_pipeline)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--profile", default=None)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from incompat.data import DataError
    from incompat.files import OutputError

    try:
        return args.func(args)
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


if __name__ == "__main__":
    sys.exit(main())
