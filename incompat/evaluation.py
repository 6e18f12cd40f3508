"""Retrain on a (kept) training set and measure it: clean accuracy, attack success, targeted misclassification."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from incompat.data import ImageSet
from incompat.metrics import attack_success_rate, clean_accuracy, targeted_misclassification
from incompat.training import ComputeMeter, TensorData, TrainConfig, fit, predict


@dataclass
class Evaluation:
    clean_accuracy: float
    attack_success_rate: float | None
    targeted_misclassification: float | None
    train_size: int
    model: torch.nn.Module

    def as_dict(self) -> dict:
        return {"clean_accuracy": self.clean_accuracy, "attack_success_rate": self.attack_success_rate,
                "targeted_misclassification": self.targeted_misclassification, "train_size": self.train_size}


def train_and_evaluate(train: ImageSet, test: ImageSet, cfg: TrainConfig, indices: np.ndarray | None = None,
                       test_triggered: ImageSet | None = None, target: int | None = None,
                       meter: ComputeMeter | None = None, progress: bool = False) -> Evaluation:
    """Train a fresh model on `train[indices]` and evaluate it on the clean and the triggered test sets.

    Normalisation statistics come from the training images, so the test sets reuse them."""
    data = TensorData(train.images, train.labels, num_classes=train.n_classes)
    model = fit(data, cfg.for_classes(train.class_names), indices=indices, meter=meter, progress=progress)
    return evaluate(model, data, test, test_triggered, target, len(train) if indices is None else len(indices))


def evaluate(model: torch.nn.Module, train_data: TensorData, test: ImageSet, test_triggered: ImageSet | None,
             target: int | None, train_size: int) -> Evaluation:
    test_data = TensorData(test.images, test.labels, mean=train_data.mean, std=train_data.std,
                           num_classes=train_data.num_classes)
    test_preds = predict(model, test_data)
    asr = tmr = None
    if test_triggered is not None and target is not None:
        trig_data = TensorData(test_triggered.images, test_triggered.labels, mean=train_data.mean,
                               std=train_data.std, num_classes=train_data.num_classes)
        trig_preds = predict(model, trig_data)
        asr = attack_success_rate(trig_preds, target)
        # The paper's targeted misclassification needs the clean version of each triggered image.
        position = {sid: i for i, sid in enumerate(test.sample_ids)}
        clean_rows = np.array([position[sid] for sid in test_triggered.sample_ids])
        tmr = targeted_misclassification(test_preds[clean_rows], trig_preds, test_triggered.labels, target)
    return Evaluation(clean_accuracy(test_preds, test.labels), asr, tmr, train_size, model)
