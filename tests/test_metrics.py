import numpy as np
import pytest

from incompat.metrics import attack_success_rate, clean_accuracy, detection_confusion, targeted_misclassification


def test_clean_accuracy_counts_matches():
    assert clean_accuracy(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])) == pytest.approx(0.75)
    assert clean_accuracy([3], [3]) == 1.0


def test_attack_success_rate_is_fraction_predicted_as_target():
    assert attack_success_rate(np.array([5, 5, 3, 5, 0]), target=5) == pytest.approx(0.6)
    assert attack_success_rate(np.array([1, 2]), target=5) == 0.0


def test_targeted_misclassification_only_counts_correct_clean_versions():
    labels = np.array([3, 3, 3, 3, 3])
    clean = np.array([3, 3, 3, 0, 5])  # the last two are already wrong without the trigger
    triggered = np.array([5, 5, 3, 5, 5])
    # Of the 3 correctly classified clean images, 2 flip to the target; the wrong ones are ignored.
    assert targeted_misclassification(clean, triggered, labels, target=5) == pytest.approx(2 / 3)
    # ...whereas the plain attack success rate counts all five.
    assert attack_success_rate(triggered, 5) == pytest.approx(4 / 5)


def test_targeted_misclassification_with_no_correct_clean_prediction_is_zero():
    assert targeted_misclassification([1, 1], [5, 5], [3, 3], target=5) == 0.0


def test_detection_confusion_hand_computed():
    poison = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
    removed = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0], dtype=bool)
    got = detection_confusion(removed, poison)
    assert got == {
        "poison_total": 4, "poison_removed": 3, "clean_total": 6, "clean_removed": 1,
        "recall": pytest.approx(0.75), "precision": pytest.approx(0.75),
        "clean_removed_fraction": pytest.approx(1 / 6),
    }
    assert all(type(got[k]) is int for k in ("poison_total", "poison_removed", "clean_total", "clean_removed"))


def test_detection_confusion_zero_denominators():
    nothing_removed = detection_confusion(np.zeros(4, bool), np.array([1, 0, 0, 0], bool))
    assert nothing_removed["precision"] == 1.0 and nothing_removed["recall"] == 0.0
    no_poison = detection_confusion(np.array([1, 0, 0], bool), np.zeros(3, bool))
    assert no_poison["recall"] == 1.0 and no_poison["precision"] == 0.0
    assert no_poison["clean_removed_fraction"] == pytest.approx(1 / 3)
    all_poison = detection_confusion(np.array([1, 0], bool), np.ones(2, bool))
    assert all_poison["clean_total"] == 0 and all_poison["clean_removed_fraction"] == 0.0
    assert all_poison["recall"] == 0.5 and all_poison["precision"] == 1.0


def test_detection_confusion_accepts_0_1_ints_but_not_other_values():
    assert detection_confusion([1, 0], [1, 0])["recall"] == 1.0
    with pytest.raises(ValueError, match="boolean mask"):
        detection_confusion([2, 0], [1, 0])


@pytest.mark.parametrize("call", [
    lambda: clean_accuracy([], []),
    lambda: attack_success_rate(np.array([], dtype=np.int64), 1),
    lambda: targeted_misclassification([], [], [], 1),
    lambda: detection_confusion(np.array([], bool), np.array([], bool)),
])
def test_empty_inputs_are_refused(call):
    with pytest.raises(ValueError, match="empty"):
        call()


def test_length_mismatch_is_refused():
    with pytest.raises(ValueError, match="length mismatch"):
        clean_accuracy([1, 2], [1])
    with pytest.raises(ValueError, match="length mismatch"):
        detection_confusion([True], [True, False])


def test_attack_neutralised_uses_one_percent_or_the_oracle_floor():
    from incompat.metrics import attack_neutralised

    assert attack_neutralised(0.01, 0.0)  # at the 1% line
    assert not attack_neutralised(0.0101, 0.0)
    assert attack_neutralised(0.035, 0.03)  # a model that confuses the pair 3% of the time by itself
    assert not attack_neutralised(0.036, 0.03)
    with pytest.raises(ValueError, match="tmr_after"):
        attack_neutralised(3.5, 0.03)  # a percentage passed as a fraction
