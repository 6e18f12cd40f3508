"""The command line for scenarios and poisoning: outputs, exit codes, and bad input that writes nothing."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from flows.cli import main
from incompat.attacks import parse_scenario_spec
from incompat.data import read_dataset, write_dataset
from tests.conftest import make_imageset


@pytest.fixture
def cifar_like(tmp_path):
    train = make_imageset(n_per_class=40, n_classes=10, size=32, prefix="train")
    test = make_imageset(n_per_class=10, n_classes=10, size=32, seed=1, prefix="test")
    write_dataset(train, tmp_path / "train.parquet")
    write_dataset(test, tmp_path / "test.parquet")
    return tmp_path


def test_scenarios_json_matches_the_paper_grid(capsys):
    assert main(["scenarios", "--paper-seed", "100", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert len(table) == 24
    assert table[2] == {"id": 2, "source": 3, "target": 5, "kind": "ell", "position": [2, 14],
                        "color": [34, 241, 240], "rate": 0.05}
    assert table[15] == {"id": 15, "source": 3, "target": 7, "kind": "pattern", "position": [16, 2],
                         "color": [61, 14, 183], "rate": 0.1}


def test_poison_writes_all_outputs(cifar_like, capsys):
    out = cifar_like / "poisoned"
    rc = main(["poison", str(cifar_like / "train.parquet"), "--scenario", "paper:100:15", "--out", str(out),
               "--test", str(cifar_like / "test.parquet"), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_poison"] == 4  # int(0.1 * 40 cats)
    poisoned = read_dataset(out / "train.parquet", verify=True)
    truth = pq.read_table(out / "truth.parquet").to_pydict()
    assert truth["sample_id"] == list(poisoned.sample_ids)
    is_poison = np.array(truth["is_poison"])
    assert is_poison.sum() == 4
    assert (poisoned.labels[is_poison] == 7).all()
    original = read_dataset(cifar_like / "train.parquet")
    assert (original.labels[is_poison] == 3).all()
    # The 5-pixel X at (16, 2), colour (61, 14, 183), and nothing else changed.
    changed = np.any(poisoned.images != original.images, axis=-1)
    assert set(zip(*np.nonzero(changed[is_poison][0]))) <= {(16, 2), (15, 1), (15, 3), (17, 1), (17, 3)}
    assert (poisoned.images[is_poison][:, 16, 2] == [61, 14, 183]).all()
    assert not changed[~is_poison].any()
    trig = read_dataset(out / "test_triggered.parquet")
    assert len(trig) == 10 and (trig.labels == 3).all()
    resolved = yaml.safe_load((out / "scenario.yaml").read_text())
    assert parse_scenario_spec(str(out / "scenario.yaml")).trigger.position == (16, 2)
    assert resolved["attack"]["target"] == 7


@pytest.mark.parametrize("spec_yaml, message", [
    ({"name": "same", "seed": 1, "attack": {"kind": "pixel", "source": 3, "target": 3, "rate": 0.1,
                                             "position": [1, 1], "color": [1, 2, 3]}}, "source"),
    ({"name": "outside", "seed": 1, "attack": {"kind": "pattern", "source": 3, "target": 5, "rate": 0.1,
                                                "position": [31, 5], "color": [1, 2, 3]}}, "outside|fit"),
])
def test_bad_scenarios_fail_cleanly_and_write_nothing(cifar_like, capsys, spec_yaml, message):
    spec = cifar_like / "bad.yaml"
    spec.write_text(yaml.safe_dump(spec_yaml))
    out = cifar_like / "poisoned"
    rc = main(["poison", str(cifar_like / "train.parquet"), "--scenario", str(spec), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback" not in err
    import re

    assert re.search(message, err)
    assert not out.exists() or not any(out.iterdir())


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["poison"])
    assert exc.value.code == 2
    assert main([]) == 2
