"""Parameters are checked where they enter: params.yaml, --set, the command line. Every error is one line naming
the file, group and key (or the --set flag), and none of it waits for Prefect to start."""

import dataclasses
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli import main
from incompat.bounds import declared_rules
from incompat.config import ConfigError, GridParams, IngestParams, PoisonParams, load_params, parse_overrides
from incompat.ispl import DefenseConfig
from incompat.safe_yaml import YamlInputError, load_yaml
from incompat.training import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / ".venv" / "bin" / "incompat"


def write(tmp_path, text, name="params.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------- missing file

def test_a_missing_params_file_is_an_error_naming_it_not_the_defaults(tmp_path, capsys):
    missing = tmp_path / "parms.yaml"
    with pytest.raises(ConfigError, match=f"{missing}: no such parameter file"):
        load_params(missing)
    with pytest.raises(ConfigError, match="is not a file"):
        load_params(tmp_path)
    # `incompat step` (what dvc.yaml runs) reads the file first: one line, exit 1
    assert main(["step", "cluster", "--params", str(missing), "--data-dir", str(tmp_path / "data")]) == 1
    assert one_line_error(capsys) == (f"incompat step: error: {missing}: no such parameter file (--params names the "
                                      "parameter file; the project's is params.yaml)")
    assert not (tmp_path / "data").exists()
    # the built-in defaults only when asked for by name
    defaults = load_params(None)
    assert defaults.profile == "paper" and defaults.defense == DefenseConfig() and defaults.train == TrainConfig()


# ------------------------------------------------------------------------------------ every group is typed

@pytest.mark.parametrize("text, message", [
    ("ingest: {subset: lots}", "[ingest] subset: must be an integer >= 1 or null, got 'lots'"),
    ("ingest: {subset: 0}", "[ingest] subset: must be an integer >= 1 or null, got 0"),
    ("ingest: {subset: true}", "[ingest] subset: must be an integer >= 1 or null, got True"),
    ("ingest: {seed: -1}", "[ingest] seed: must be an integer in [0, 4294967296), got -1"),
    ("ingest: {on_bad_sample: ignore}", "[ingest] on_bad_sample: must be one of 'fail', 'skip', got 'ignore'"),
    ("ingest: {image_size: [32]}", "[ingest] image_size: List should have at least 2 items after validation"),
    ("ingest: {image_size: [32, 0]}", "[ingest] image_size.1: Input should be greater than or equal to 1, got 0"),
    ("ingest: {source: ''}", "[ingest] source: must be a non-empty string, got ''"),
    ("poison: {scenario: 3}", "[poison] scenario: must be a non-empty string, got 3"),
    ("grid: {workers: 0}", "[grid] workers: must be an integer >= 1, got 0"),
    ("grid: {ids: '0-99'}", "[grid] ids: must look like 0-23 or 2,15"),
    ("grid: {ids: '5-2'}", "[grid] ids: must look like 0-23 or 2,15"),
    ("grid: {memory_limit: lots}", "[grid] memory_limit: must be a size such as 4GiB"),
    ("grid: {retrain: 'yes'}", "[grid] retrain: must be true or false, got 'yes'"),
    ("grid: {scenarios: []}", "[grid] scenarios: List should have at least 1 item"),
    ("grid: {scenarios: [[a]]}", "[grid] scenarios.0: Input should be a valid string"),
    ("train: {epochs: 0}", "[train] epochs: must be an integer >= 1, got 0"),
    ("train: {epochs: 2.5}", "[train] epochs: must be an integer >= 1, got 2.5"),
    ("train: {lr: .inf}", "[train] lr: must be a finite number > 0, got inf"),
    ("train: {lr: .nan}", "[train] lr: must be a finite number > 0, got nan"),
    ("train: {model: resnet}",
     "[train] model: must be one of 'small_cnn', 'resnet32', 'preact_resnet18', got 'resnet'"),
    ("train: {momentum: 1.0}", "[train] momentum: must be a number in [0, 1), got 1.0"),
    ("train: {milestones: [0.5, 2]}", "[train] milestones.1: Input should be less than 1"),
    ("train: {milestones: [0.7, 0.2]}", "[train]: train config: milestones must be increasing fractions in (0, 1)"),
    ("train: {threads: 0}", "[train] threads: must be an integer >= 1 or null, got 0"),
    ("train: 5", "[train]: must be a mapping of keys to values, got 5"),
])
def test_every_group_is_typed_and_range_checked(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(info.value).startswith(f"{path} {message}"), str(info.value)
    assert "\n" not in str(info.value)


def test_good_values_of_every_group_load(tmp_path):
    path = write(tmp_path, """
ingest: {subset: 500, seed: 3, image_size: [32, 32], on_bad_sample: skip, test_source: null}
poison: {scenario: my_attack.yaml}
train: {epochs: 2, lr: 1, milestones: [0.3, 0.6], flip_pairs: [[0, 1], [keep left, keep right]]}
grid: {scenarios: ['paper:100:2'], ids: '0-3,7', workers: 2, memory_limit: 500MB, retrain: false}
""")
    params = load_params(path)
    assert params.ingest.image_size == [32, 32] and params.ingest.test_source is None
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)
    assert params.train.milestones == (0.3, 0.6) and params.train.flip_pairs == ((0, 1), ("keep left", "keep right"))
    assert (params.grid.ids, params.grid.workers, params.grid.retrain) == ("0-3,7", 2, False)


# --------------------------------------------------------------------------- ranges, named by their origin

@pytest.mark.parametrize("override, message", [
    ("refinement_rounds=-5", "--set refinement_rounds: must be an integer >= 0, got -5"),
    ("vote_min_count=0", "--set vote_min_count: must be an integer >= 1, got 0"),
    ("beta=.inf", "--set beta: must be a finite number >= 1, got inf"),
    ("bags=1.5", "--set bags: must be an integer >= 1, got 1.5"),
    ("min_active=5", "--set min_active: must be a number in [0, 1), got 5"),
    ("class_floor=-3", "--set class_floor: must be a number in [0, 1], got -3"),
    ("data_fraction=1e-9", "--set data_fraction: must be a number in [0.01, 1], got 1e-09"),
    ("refinement_threshold=1.5", "--set refinement_threshold: must be a number in [0, 1], got 1.5"),
    ("anomaly_z=-1", "--set anomaly_z: must be a finite number >= 0, got -1"),
    ("seed=-1", "--set seed: must be an integer in [0, 4294967296), got -1"),
    ("vote_rule=majority", "--set vote_rule: must be one of 'plurality', 'held_out', got 'majority'"),
    ("learner_train.epochs=0", "--set learner_train.epochs: must be an integer >= 1, got 0"),
    ("learner_train.lr=-1", "--set learner_train.lr: must be a finite number > 0, got -1"),
    ("nosuch=1", "--set nosuch: unknown key; known: bags, boost, beta, "),
    ("learner_train.lr_peak=1", "--set learner_train.lr_peak: unknown key; known: model, width, epochs, "),
])
def test_defense_values_are_range_checked_and_name_the_flag(override, message):
    with pytest.raises(ConfigError) as info:
        load_params(ROOT / "params.yaml", defense_overrides=parse_overrides([override]))
    assert str(info.value).startswith(message), str(info.value)


def test_a_bad_value_names_the_group_or_profile_it_came_from(tmp_path):
    path = write(tmp_path, "defense: {profile: quick, refinement_rounds: -5}\ndefense_profiles: {quick: {}}\n")
    with pytest.raises(ConfigError, match=r"^.*params.yaml \[defense\] refinement_rounds: must be an integer >= 0, "
                                          r"got -5$"):
        load_params(path)
    path = write(tmp_path, "defense: {profile: quick}\ndefense_profiles: {quick: {learner_train: {lr: 0}}}\n")
    with pytest.raises(ConfigError, match=r"\[defense_profiles.quick\] learner_train.lr: must be a finite number > 0"):
        load_params(path)
    # a rule between two fields names the profile
    path = write(tmp_path, "defense: {profile: quick}\ndefense_profiles: {quick: {refinement_class_floor: 0.5}}\n")
    with pytest.raises(ConfigError, match=r"\[defense, profile quick\]: .*refinement_class_floor applies to the "
                                          r"cross-fitted refinement only"):
        load_params(path)


def test_every_numeric_field_declares_its_range():
    """A new field without a declared range would be accepted at any value: each number has bounds, each float is
    finite, each string has choices or a length bound (or is checked by its config's validate())."""
    checked_in_validate = {(TrainConfig, "device")}
    for cls in (DefenseConfig, TrainConfig, IngestParams, PoisonParams, GridParams):
        for name, rule in declared_rules(cls).items():
            if rule.base in (int, float):
                assert rule.bounds, (cls.__name__, name)
            if rule.base is float:
                assert "finite" in rule.describe() or "in [" in rule.describe() or "in (" in rule.describe(), name
            if rule.base is str and (cls, name) not in checked_in_validate:
                assert rule.bounds or rule.choices, (cls.__name__, name)


def test_configs_built_in_code_are_checked_against_the_same_declarations():
    with pytest.raises(ValueError, match=r"defense.refinement_rounds must be an integer >= 0, got -5"):
        DefenseConfig(refinement_rounds=-5).validate()
    with pytest.raises(ValueError, match=r"train config: lr must be a finite number > 0, got inf"):
        TrainConfig(lr=float("inf"))
    with pytest.raises(ValueError, match=r"defense.vote_min_count must be an integer >= 1, got 0"):
        DefenseConfig.from_dict({"vote_min_count": 0})


def test_loading_stays_cheap():
    load_params(ROOT / "params.yaml")  # the validators are built once per process
    started = time.perf_counter()
    for _ in range(10):
        load_params(ROOT / "params.yaml", profile="cpu_crossfit", defense_overrides={"boost": 2})
    assert (time.perf_counter() - started) / 10 < 0.25


# -------------------------------------------------------------------------------------------------- YAML

def _alias_bomb(levels: int) -> str:
    """The billion laughs as YAML lists: each level is nine aliases of the one before."""
    lines = ['  l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "defense_profiles:\n  paper: {}\n  bomb:\n" + "\n".join("  " + line for line in lines) + \
        f"\ngrid:\n  scenarios: *l{levels - 1}\n"


def test_alias_bomb_is_refused_before_it_is_expanded(tmp_path):
    text = _alias_bomb(9)  # 9**9 leaves: 387 million strings once walked
    assert len(text.encode()) < 1000
    path = write(tmp_path, text)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"^{path}: YAML expands to over 100,000 values through its aliases"):
        load_params(path)
    assert time.perf_counter() - started < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # KiB
    # a small one (9**6 leaves) says the same instead of expanding into a type error
    with pytest.raises(ConfigError, match="through its aliases"):
        load_params(write(tmp_path, _alias_bomb(6)))
    # and so does a --set value
    bomb = "[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], " \
           "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e]]"
    with pytest.raises(ConfigError, match="^--set seed: YAML expands to over"):
        parse_overrides([f"seed={bomb}"])


def test_yaml_anchors_within_reason_and_recursive_aliases():
    assert load_yaml("a: &x [1, 2]\nb: *x\nc: {<<: {k: 1}}\n", "t.yaml") == {"a": [1, 2], "b": [1, 2], "c": {"k": 1}}
    with pytest.raises(YamlInputError, match=r"^t.yaml line 1: an alias refers to a node that contains it"):
        load_yaml("&a [1, *a]", "t.yaml")


def test_python_tag_in_params_is_one_line_through_the_command_line(tmp_path):
    marker = tmp_path / "ran"
    write(tmp_path, f"defense: !!python/object/apply:os.system ['touch {marker}']\n", "bad.yaml")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    done = subprocess.run([str(CLI), "evaluate", "--params", "bad.yaml", "--no-retrain"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1, done.stderr
    assert re.fullmatch(r"incompat evaluate: error: bad.yaml line 1 column \d+: could not determine a constructor "
                        r"for the tag 'tag:yaml.org,2002:python/object/apply:os.system'", done.stderr.strip()), \
        done.stderr
    assert not marker.exists() and not (tmp_path / "prefect").exists()


@pytest.mark.parametrize("text, message", [
    # (libyaml's and PyYAML's parsers word some problems differently)
    ("defense:\n  bags: [1, 2\n  boost: 3\n", r"bad.yaml line 3 column 8: .*expected ',' or ']'"),
    ("defense: {bags: 1}\n\tboost: 2\n", r"bad.yaml line 2 column 1: found character .*that cannot start any token"),
    ("- just\n- a list\n", r"bad.yaml: expected a mapping of parameter groups, got list"),
    ("a: 1\n---\nb: 2\n", r"bad.yaml line 2 column 1: but found another document \(expected a single document"),
])
def test_malformed_yaml_is_one_line_naming_file_and_line(tmp_path, monkeypatch, capsys, text, message):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, text, "bad.yaml")
    assert main(["sanitize", "data.parquet", "--out", "out", "--params", "bad.yaml"]) == 1
    assert re.match(f"incompat sanitize: error: {message}", one_line_error(capsys))


# --------------------------------------------------------------------------------------- before Prefect

def test_a_bad_set_fails_fast_naming_the_flag_before_prefect_is_imported(tmp_path):
    """Checked before the flow's machinery: before, `--set nosuch=1` failed ~26 s in, after a Prefect server
    start, and blamed params.yaml."""
    code = ("import sys\nfrom flows.cli import main\n"
            f"rc = main(['evaluate', '--params', {str(ROOT / 'params.yaml')!r}, '--set', 'nosuch=1', "
            "'--no-retrain'])\n"
            "print(rc, 'prefect' in sys.modules, 'mlflow' in sys.modules)\n")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=env)
    elapsed = time.perf_counter() - started
    assert done.stdout.split() == ["1", "False", "False"], (done.stdout, done.stderr)
    assert done.stderr.startswith("incompat evaluate: error: --set nosuch: unknown key; known: bags, boost, ")
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "prefect").exists()
    assert elapsed < 60  # torch's import on a busy 2-core machine; no server start


def test_bad_params_for_a_grid_fail_before_the_flow(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "grid: {workers: 0}\n")
    assert main(["grid", "--no-retrain"]) == 1
    assert one_line_error(capsys) == "incompat grid: error: params.yaml [grid] workers: must be an integer >= 1, got 0"


# -------------------------------------------------------------------------------------------------- version

def test_version_prints_package_and_commit(capsys):
    from incompat import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out.strip()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                            text=True)
    expected = f"incompat {__version__}" + (f" (git {commit.stdout.strip()})" if commit.returncode == 0 else "")
    assert out == expected


def test_a_dataclass_default_is_valid_under_its_own_declaration():
    for cls in (DefenseConfig, TrainConfig, IngestParams, PoisonParams, GridParams):
        rules = declared_rules(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert rules[f.name].accepts(default), (cls.__name__, f.name, default)
