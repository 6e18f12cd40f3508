import pytest

from incompat.config import ConfigError, load_params


def write(tmp_path, text):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def test_repo_params_load_with_the_default_and_every_profile():
    params = load_params("params.yaml")
    # The default needs nothing written for the dataset: its trigger stage finds mirror-image classes itself.
    assert params.profile == "cpu_trigger"
    assert params.defense.vote_rule == "held_out" and params.defense.learner_train.model == "small_cnn"
    assert params.defense.trigger_epochs > 0 and params.defense.detect_mirrors
    assert params.defense.learner_train.flip_pairs == ()
    cpu = load_params("params.yaml", profile="cpu")
    assert cpu.defense.bags == 1
    assert cpu.defense.learner_train.model == "small_cnn"
    assert cpu.defense.refinement_judge == "outside"
    paper = load_params("params.yaml", profile="paper")
    assert (paper.defense.bags, paper.defense.boost, paper.defense.beta) == (3, 8, 4.0)
    assert paper.defense.refinement_rounds == 20 and paper.defense.learner_train.model == "resnet32"
    assert paper.defense.refinement_judge == "all"
    crossfit = load_params("params.yaml", profile="cpu_crossfit")
    assert (crossfit.defense.vote_rule, crossfit.defense.refinement_folds, crossfit.defense.boost) == ("held_out", 2, 1)
    assert crossfit.defense.learner_train.model == "small_cnn"


def test_profile_then_group_then_cli_overrides(tmp_path):
    p = write(tmp_path, """
defense: {profile: fast, boost: 5}
defense_profiles:
  fast: {boost: 3, bags: 2, learner_train: {epochs: 2, lr: 0.3}}
""")
    params = load_params(p)
    assert params.defense.bags == 2 and params.defense.boost == 5
    assert params.defense.learner_train.lr == 0.3
    params = load_params(p, defense_overrides={"boost": 7, "learner_train": {"lr": 0.01}})
    assert params.defense.boost == 7 and params.defense.learner_train.lr == 0.01
    assert params.defense.learner_train.epochs == 2


@pytest.mark.parametrize("text, message", [
    ("ingest: {sourse: x}", r"\[ingest\] sourse: unknown key; known: source, "),
    ("defense: {profile: nope}", "unknown defense profile"),
    ("defense: {boots: 3}", r"\[defense\] boots: unknown key"),
    ("train: {epochz: 3}", r"\[train\]"),
    ("whatever: {}", "unknown parameter group"),
    ("defense: {decision: magic}", "decision"),
])
def test_bad_params_are_named(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_params(write(tmp_path, text))


def test_overrides_parse_dotted_keys_and_yaml_values():
    from incompat.config import parse_overrides

    assert parse_overrides(["boost=4", "learner_train.lr=0.01", "learner_train.model=resnet32"]) == {
        "boost": 4, "learner_train": {"lr": 0.01, "model": "resnet32"}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["boost"])


def test_papers_alpha_name_and_null_means_the_profiles_value(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("defense: {profile: cpu, alpha: null}\ndefense_profiles: {cpu: {boost: 4}}\n")
    assert load_params(path).defense.boost == 4
    path.write_text("defense: {profile: cpu, alpha: 6}\ndefense_profiles: {cpu: {boost: 4}}\n")
    assert load_params(path).defense.boost == 6
    assert load_params(path, defense_overrides={"alpha": 2}).defense.boost == 2


def test_grid_group_is_typed(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("grid: {paper_seed: 1000, ids: '2,15', workers: 2}\n")
    grid = load_params(path).grid
    assert (grid.paper_seed, grid.ids, grid.workers, grid.out) == (1000, "2,15", 2, "data/grid")
    path.write_text("grid: {worker: 2}\n")
    with pytest.raises(ConfigError, match=r"\[grid\].*worker"):
        load_params(path)
