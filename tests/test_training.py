"""The trainer on tiny synthetic data (16x16 images, a few hundred samples, width-8 CNN): each test runs in well
under a second on 2 cores."""

import dataclasses
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from incompat.training import (
    MIN_LAST_BATCH, ComputeMeter, TensorData, TrainConfig, TrainingDiverged, extract_features, fit, lr_at,
    per_sample_loss, predict, predict_logits, resolve_device,
)

FAST = dict(model="small_cnn", width=8, epochs=3, batch_size=32, lr=0.1, threads=1)


def quadrant_task(n=256, size=16, seed=0):
    """Class k = quadrant k (row-major) is bright; the rest is noise. Position-only: learnable without
    augmentation (a global-average-pooled CNN sees position only through the borders, which random crops blur)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=n)
    images = rng.integers(0, 90, size=(n, size, size, 3), dtype=np.uint8)
    half = size // 2
    for i, k in enumerate(labels):
        r, c = divmod(int(k), 2)
        images[i, r * half:(r + 1) * half, c * half:(c + 1) * half] += 150
    return images, labels.astype(np.int64)


COLOURS = np.array([[255, 40, 40], [40, 255, 40], [40, 40, 255], [255, 255, 255]], dtype=np.uint8)


def colour_task(n=256, size=16, seed=0):
    """Class k = a 6x6 patch of colour k at a random place on a noise background: survives crops and flips."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=n)
    images = rng.integers(0, 100, size=(n, size, size, 3), dtype=np.uint8)
    for i, k in enumerate(labels):
        r, c = rng.integers(0, size - 6, size=2)
        images[i, r:r + 6, c:c + 6] = COLOURS[k]
    return images, labels.astype(np.int64)


@pytest.fixture(scope="module")
def quadrants():
    images, labels = colour_task()
    return TensorData(images, labels), labels


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_learns_a_learnable_task(quadrants):
    data, labels = quadrants
    model = fit(data, TrainConfig(**FAST), progress=False)
    assert (predict(model, data) == labels).mean() >= 0.9
    assert not model.training  # returned in eval mode
    # Held-out images of the same task: learnt, not memorised.
    images, test_labels = colour_task(n=128, seed=1)
    test = TensorData(images, test_labels, mean=data.mean, std=data.std)
    assert (predict(model, test) == test_labels).mean() >= 0.9


def test_learns_position_without_augmentation():
    images, labels = quadrant_task()
    data = TensorData(images, labels)
    model = fit(data, TrainConfig(**{**FAST, "augment": False}), progress=False)
    assert (predict(model, data) == labels).mean() >= 0.9


def test_same_seed_is_bit_identical_other_seed_differs(quadrants):
    data, _ = quadrants
    cfg = TrainConfig(**{**FAST, "epochs": 1})
    a, b = state(fit(data, cfg, progress=False)), state(fit(data, cfg, progress=False))
    c = state(fit(data, dataclasses.replace(cfg, seed=1), progress=False))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_fit_does_not_touch_the_global_rng(quadrants):
    data, _ = quadrants
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit(data, TrainConfig(**{**FAST, "epochs": 1}), progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_meter_counts_exact_sample_passes(quadrants):
    data, _ = quadrants
    meter = ComputeMeter()
    # 100 samples, batch 32: 32+32+32+4 (a remainder of MIN_LAST_BATCH is kept)
    assert MIN_LAST_BATCH == 4
    fit(data, TrainConfig(**{**FAST, "epochs": 2}), indices=np.arange(100), meter=meter, progress=False)
    assert meter.train_samples == 200 and meter.infer_samples == 0
    # 98 samples: the remainder of 2 is dropped each epoch
    fit(data, TrainConfig(**{**FAST, "epochs": 2}), indices=np.arange(98), meter=meter, progress=False)
    assert meter.train_samples == 200 + 2 * 96
    model = fit(data, TrainConfig(**{**FAST, "epochs": 1}), indices=np.arange(3), progress=False)  # 1 small batch
    predict(model, data, meter=meter)
    per_sample_loss(model, data, np.arange(10), meter=meter)
    predict_logits(model, data, np.arange(7), meter=meter, batch_size=4)
    assert meter.infer_samples == len(data) + 10 + 7
    assert meter.epoch_equivalents(100) == pytest.approx((392 + (256 + 17) / 3) / 100)


def test_subset_training_sees_only_the_given_indices(quadrants, monkeypatch):
    data, labels = quadrants
    subset = np.flatnonzero(labels < 2)
    seen = []
    real_batch = TensorData.augmented_batch  # FAST trains with augmentation

    def spy(self, idx, *args, **kwargs):
        seen.append(idx.cpu().numpy().copy())
        return real_batch(self, idx, *args, **kwargs)

    monkeypatch.setattr(TensorData, "augmented_batch", spy)
    meter = ComputeMeter()
    model = fit(data, TrainConfig(**FAST), indices=subset, meter=meter, progress=False)
    trained_on = np.concatenate(seen)
    assert set(trained_on.tolist()) == set(subset.tolist())  # every subset sample, nothing else
    assert meter.train_samples == 3 * len(subset)
    monkeypatch.undo()
    # Classes 2 and 3 were never shown: the model does not predict them, even on their own images.
    assert set(np.unique(predict(model, data)).tolist()) <= {0, 1}


def test_boolean_mask_and_repeated_indices(quadrants):
    data, labels = quadrants
    meter = ComputeMeter()
    fit(data, TrainConfig(**{**FAST, "epochs": 1}), indices=labels == 0, meter=meter, progress=False)
    full, rest = divmod(int((labels == 0).sum()), 32)
    assert meter.train_samples == 32 * full + (rest if rest >= MIN_LAST_BATCH else 0)
    bag = np.array([0, 0, 0, 1, 1, 2] * 10)  # a bootstrap bag repeats samples
    fit(data, TrainConfig(**{**FAST, "epochs": 1}), indices=bag, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        fit(data, TrainConfig(**FAST), indices=np.array([0, len(data)]), progress=False)
    with pytest.raises(ValueError, match="empty"):
        fit(data, TrainConfig(**FAST), indices=np.array([], dtype=np.int64), progress=False)


def test_continue_training_updates_the_given_model(quadrants):
    data, _ = quadrants
    cfg = TrainConfig(**{**FAST, "epochs": 1})
    model = fit(data, cfg, progress=False)
    before = state(model)
    again = fit(data, cfg, model=model, progress=False)
    assert again is model
    assert any(not torch.equal(before[k], v) for k, v in state(model).items() if v.is_floating_point())


def test_divergence_raises_training_diverged(quadrants):
    data, _ = quadrants
    with pytest.raises(TrainingDiverged, match=r"epoch \d+/\d+, step \d+") as info:
        fit(data, TrainConfig(**{**FAST, "lr": 1e30}), progress=False)
    assert isinstance(info.value, RuntimeError)


def test_all_ones_sample_weights_equal_no_weights(quadrants):
    data, _ = quadrants
    cfg = TrainConfig(**{**FAST, "epochs": 1})
    plain = state(fit(data, cfg, progress=False))
    weighted = state(fit(data, cfg, progress=False, sample_weights=np.ones(len(data))))
    assert all(torch.equal(plain[k], weighted[k]) for k in plain)
    with pytest.raises(ValueError, match="one weight per sample"):
        fit(data, cfg, progress=False, sample_weights=np.ones(3))
    with pytest.raises(ValueError, match="finite"):
        fit(data, cfg, progress=False, sample_weights=-np.ones(len(data)))


def test_trimmed_loss_learns_fewer_mislabelled_samples():
    """loss_trim leaves each batch's highest losses out of the gradient: trained long enough to memorise label
    noise, the plain mean fits the wrong labels of the flipped samples and the trimmed loss fits far fewer of them,
    while both learn the task."""
    images, labels = colour_task(n=160, seed=3)
    rng = np.random.default_rng(0)
    flipped = rng.choice(len(labels), size=16, replace=False)
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, 4, size=len(flipped))) % 4
    data = TensorData(images, noisy)
    fitted = {}
    for trim in (0.0, 0.2):
        # Wider, longer and without augmentation than FAST: enough capacity to memorise the 16 flipped samples.
        cfg = TrainConfig(**{**FAST, "width": 16, "epochs": 20, "augment": False, "loss_trim": trim})
        model = fit(data, cfg, progress=False)
        predicted = predict(model, data)
        rest = np.setdiff1d(np.arange(len(labels)), flipped)
        assert (predicted[rest] == labels[rest]).mean() >= 0.9
        fitted[trim] = int((predicted[flipped] == noisy[flipped]).sum())
    assert fitted[0.0] >= 12 and fitted[0.2] <= 3, fitted
    with pytest.raises(ValueError, match="loss_trim"):
        TrainConfig(loss_trim=1.0)


# --------------------------------------------------------------------------------------- batches, augmentation

def reference_crop_flip(images_nhwc, idx, dy, dx, flip, pad=4):
    """torchvision's RandomCrop(padding=pad, fill=0) then RandomHorizontalFlip, one sample at a time."""
    n, h, w, c = images_nhwc.shape
    out = []
    for i, k in enumerate(idx):
        padded = np.zeros((h + 2 * pad, w + 2 * pad, c), dtype=np.uint8)
        padded[pad:pad + h, pad:pad + w] = images_nhwc[k]
        top, left = dy[i] + pad, dx[i] + pad
        crop = padded[top:top + h, left:left + w]
        out.append(crop[:, ::-1] if flip[i] else crop)
    return np.stack(out)


def test_augmentation_without_flip_crops_only_and_draws_the_same_shifts():
    images, labels = quadrant_task(n=40, size=12)
    data = TensorData(images, labels, mean=[0, 0, 0], std=[1 / 255] * 3)
    idx = torch.arange(40)
    got = data.batch(idx, augment=True, generator=torch.Generator().manual_seed(7), flip=False)
    gen = torch.Generator().manual_seed(7)
    shifts = torch.randint(-4, 5, (2, 40), generator=gen).numpy()
    flip = torch.randint(0, 2, (40,), generator=gen).bool().numpy()
    assert flip.any()  # the same draws would have mirrored some of these images
    expected = reference_crop_flip(images, np.arange(40), shifts[0], shifts[1], np.zeros(40, bool))
    np.testing.assert_array_equal(got.permute(0, 2, 3, 1).round().to(torch.uint8).numpy(), expected)


def test_fit_passes_flip_to_the_batches(quadrants, monkeypatch):
    data, _ = quadrants
    seen = []
    real = TensorData.augmented_batch
    monkeypatch.setattr(TensorData, "augmented_batch",
                        lambda self, *a, **k: seen.append(k.get("flip")) or real(self, *a, **k))
    fit(data, TrainConfig(**{**FAST, "epochs": 1, "flip": False}), progress=False)
    assert seen and not any(seen)


def test_augmented_batch_reports_which_samples_it_mirrored():
    images, labels = quadrant_task(n=40, size=12)
    data = TensorData(images, labels, mean=[0, 0, 0], std=[1 / 255] * 3)
    x, flipped = data.augmented_batch(torch.arange(40), torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    shifts = torch.randint(-4, 5, (2, 40), generator=gen).numpy()
    flip = torch.randint(0, 2, (40,), generator=gen).bool().numpy()
    np.testing.assert_array_equal(flipped.numpy(), flip)
    expected = reference_crop_flip(images, np.arange(40), shifts[0], shifts[1], flip)
    np.testing.assert_array_equal(x.permute(0, 2, 3, 1).round().to(torch.uint8).numpy(), expected)
    _, none = data.augmented_batch(torch.arange(40), torch.Generator().manual_seed(7), flip=False)
    assert flip.any() and not none.any()


def left_bright(n, seed, size=16):
    """Noise with a bright left half: not its own mirror image."""
    images = np.random.default_rng(seed).integers(0, 90, size=(n, size, size, 3), dtype=np.uint8)
    images[:, :, :size // 2] += 150
    return images


def test_flip_pairs_train_a_flipped_image_as_its_mirror_class():
    # Every training image is class 0 with a bright left half. With flips and no pairs the model learns that a
    # bright right half is class 0 too; with the pair (0, 1) a flipped image is trained as class 1, so the model
    # tells the two apart, as it must for keep-left and keep-right signs.
    data = TensorData(left_bright(128, 0), np.zeros(128, np.int64), num_classes=2)
    test = left_bright(64, 1)
    mirrored = np.ascontiguousarray(test[:, :, ::-1])

    def predicted(images, model):
        return predict(model, TensorData(images, np.zeros(len(images), np.int64), mean=data.mean, std=data.std,
                                         num_classes=2))

    plain = fit(data, TrainConfig(**FAST), progress=False)
    paired = fit(data, TrainConfig(**{**FAST, "flip_pairs": ((0, 1),)}), progress=False)
    assert (predicted(test, plain) == 0).all() and (predicted(mirrored, plain) == 0).all()
    assert (predicted(test, paired) == 0).mean() >= 0.9 and (predicted(mirrored, paired) == 1).mean() >= 0.9


def test_flip_pairs_from_yaml_and_their_errors():
    cfg = TrainConfig.from_dict({"flip_pairs": [[38, 39], [19, 20]]})  # as params.yaml gives them
    assert cfg.flip_pairs == ((38, 39), (19, 20)) and cfg.to_dict()["flip_pairs"] == [[38, 39], [19, 20]]
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    for bad, words in [([[3, 3]], "two different classes"), ([[0, 1], [1, 2]], "one pair only"),
                       ([[0, 1, 2]], "pairs"), ([[0, " "]], "class name"), ([[-1, 2]], ">= 0"),
                       ([[0, True]], "pairs"), ([[0, 1.0]], "pairs"), ([["keep left", "keep left"]], "different"),
                       ([["a", "b"], ["b", "c"]], "one pair only")]:
        with pytest.raises(ValueError, match=words):
            TrainConfig.from_dict({"flip_pairs": bad})
    with pytest.raises(ValueError, match="needs augment and flip"):
        TrainConfig.from_dict({"flip_pairs": [[0, 1]], "flip": False})
    data = TensorData(left_bright(40, 0), np.zeros(40, np.int64), num_classes=2)
    with pytest.raises(ValueError, match=r"class\(es\) \[5\], but the data has 2 classes"):
        fit(data, TrainConfig(**{**FAST, "epochs": 1, "flip_pairs": ((0, 5),)}), progress=False)


def test_flip_pairs_by_class_name():
    names = ["speed limit 20", "keep right", "keep left", "turn right ahead", "turn left ahead"]
    cfg = TrainConfig.from_dict({"flip_pairs": [["keep right", "keep left"], [3, "turn left ahead"]]})
    assert cfg.to_dict()["flip_pairs"] == [["keep right", "keep left"], [3, "turn left ahead"]]
    resolved = cfg.for_classes(names)
    assert resolved.flip_pairs == ((1, 2), (3, 4)) and resolved == TrainConfig(flip_pairs=((1, 2), (3, 4)))
    assert cfg.flip_pairs == (("keep right", "keep left"), (3, "turn left ahead"))  # the original is untouched
    labels_only = TrainConfig(flip_pairs=((1, 2),))
    assert labels_only.for_classes(names) is labels_only
    with pytest.raises(ValueError, match=r"'keep lef'.*closest: \['keep left'"):
        TrainConfig(flip_pairs=(("keep right", "keep lef"),)).for_classes(names)
    with pytest.raises(ValueError, match=r"'stop'.*the 5 classes"):
        TrainConfig(flip_pairs=(("keep right", "stop"),)).for_classes(names)
    # Two names of one class resolve to one label twice: caught as the pair of one class it is.
    with pytest.raises(ValueError, match="two different classes"):
        TrainConfig(flip_pairs=((1, "keep right"),)).for_classes(names)
    # Training with names left in would have to guess the labels: refused before any step.
    data = TensorData(left_bright(40, 0), np.zeros(40, np.int64), num_classes=2)
    with pytest.raises(ValueError, match=r"names classes \['b'\].*for_classes"):
        fit(data, TrainConfig(**{**FAST, "epochs": 1, "flip_pairs": ((0, "b"),)}), progress=False)


def test_final_training_reads_flip_pairs_by_class_name():
    from incompat.evaluation import train_and_evaluate
    from tests.conftest import make_imageset

    train, test = make_imageset(n_per_class=20, size=12, seed=1), make_imageset(n_per_class=10, size=12, seed=2)
    named = train_and_evaluate(train, test, TrainConfig(**{**FAST, "flip_pairs": (("class0", "class2"),)}))
    labelled = train_and_evaluate(train, test, TrainConfig(**{**FAST, "flip_pairs": ((0, 2),)}))
    for a, b in zip(named.model.state_dict().values(), labelled.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="'class5'"):
        train_and_evaluate(train, test, TrainConfig(**{**FAST, "flip_pairs": (("class0", "class5"),)}))


def test_augmentation_is_crop_then_flip_with_black_padding():
    images, labels = quadrant_task(n=40, size=12)
    data = TensorData(images, labels, mean=[0, 0, 0], std=[1 / 255] * 3)  # normalised value == pixel value
    idx = torch.arange(40)
    gen = torch.Generator().manual_seed(7)
    batch = data.batch(idx, augment=True, generator=gen)
    assert batch.shape == (40, 3, 12, 12) and batch.dtype == torch.float32
    assert batch.is_contiguous(memory_format=torch.channels_last)
    # Replay the same draws to build the reference.
    gen = torch.Generator().manual_seed(7)
    shifts = torch.randint(-4, 5, (2, 40), generator=gen).numpy()
    flip = torch.randint(0, 2, (40,), generator=gen).bool().numpy()
    expected = reference_crop_flip(images, np.arange(40), shifts[0], shifts[1], flip)
    got = batch.permute(0, 2, 3, 1).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(got, expected)
    # The draws really move and mirror pixels.
    assert flip.any() and (~flip).any() and (shifts != 0).any()
    plain = data.batch(idx).permute(0, 2, 3, 1).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(plain, images)
    changed = (got != images).any(axis=(1, 2, 3))
    assert changed.sum() >= 35  # only a no-shift, no-flip draw leaves an image as it was


def test_normalisation_uses_dataset_statistics():
    images, labels = quadrant_task(n=64, size=8)
    data = TensorData(images, labels)
    np.testing.assert_allclose(data.mean, images.reshape(-1, 3).mean(0) / 255, rtol=1e-6)
    np.testing.assert_allclose(data.std, images.reshape(-1, 3).std(0) / 255, rtol=1e-6)
    x = data.batch(torch.arange(64))
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    test = TensorData(images[:5], labels[:5], mean=data.mean, std=data.std)
    assert torch.allclose(test.batch(torch.arange(5)), x[:5])
    assert data.images.dtype == torch.uint8 and data.images.shape == (64, 3, 8, 8)
    assert data.images.is_contiguous(memory_format=torch.channels_last)
    assert data.labels.dtype == torch.int64
    with pytest.raises(ValueError, match="std"):
        TensorData(images, labels, mean=data.mean, std=[0.2, 0.0, 0.2])
    with pytest.raises(ValueError, match="uint8"):
        TensorData(images.astype(np.float32), labels)
    with pytest.raises(ValueError, match="8x8"):
        TensorData(images[:, :7, :7], labels)


# ---------------------------------------------------------------------------------------------------- inference

def test_inference_functions_agree(quadrants):
    data, labels = quadrants
    model = fit(data, TrainConfig(**{**FAST, "epochs": 1}), progress=False)
    model.train()
    idx = np.arange(0, 256, 3)
    logits = predict_logits(model, data, idx, batch_size=16)
    assert model.training  # the caller's mode is restored
    assert logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.shape == (len(idx), 4)
    losses, preds = per_sample_loss(model, data, idx)
    assert losses.dtype == np.float32 and preds.dtype == np.int64
    np.testing.assert_allclose(losses, F.cross_entropy(logits, torch.from_numpy(labels[idx]),
                                                       reduction="none").numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(preds, logits.argmax(1).numpy())
    np.testing.assert_array_equal(predict(model, data, idx), preds)
    feats = extract_features(model, data, idx)
    assert feats.dtype == np.float32 and feats.shape == (len(idx), 32)
    # logits = classifier(features), the classifier in fp32 (no bf16 rounding of logits/losses)
    with torch.no_grad():
        np.testing.assert_allclose(model.classifier(torch.from_numpy(feats)).numpy(), logits.numpy(), rtol=1e-5,
                                   atol=1e-5)
    assert len(np.unique(losses)) == len(losses)
    # Inference is deterministic (no augmentation, eval-mode BatchNorm): batch size does not matter.
    np.testing.assert_array_equal(predict(model, data, idx, batch_size=1000), preds)


# ------------------------------------------------------------------------------------------------------ config

def test_config_from_dict_refuses_unknown_keys():
    cfg = TrainConfig.from_dict({"epochs": 2, "lr": 0.05, "milestones": [0.3, 0.6]})
    assert cfg.epochs == 2 and cfg.milestones == (0.3, 0.6)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="lr_peak"):
        TrainConfig.from_dict({"lr_peak": 0.1})
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)


def test_schedules():
    total = 100
    one = TrainConfig(lr=1.0, warmup=0.2, schedule="onecycle")
    lrs = [lr_at(s, total, one) for s in range(total)]
    assert max(lrs) == pytest.approx(1.0) and int(np.argmax(lrs)) == 19
    assert lrs[0] == pytest.approx(0.05) and 0 < lrs[-1] < 0.02
    assert all(a <= b for a, b in zip(lrs[:20], lrs[1:20])) and all(a >= b for a, b in zip(lrs[19:], lrs[20:]))
    step = TrainConfig(lr=1.0, warmup=0.0, schedule="step", milestones=(0.5, 0.75), gamma=0.1)
    assert [lr_at(s, total, step) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cos = TrainConfig(lr=1.0, warmup=0.0, schedule="cosine")
    assert lr_at(0, total, cos) == pytest.approx(1.0) and lr_at(50, total, cos) == pytest.approx(0.5)
    const = TrainConfig(lr=0.3, warmup=0.0, schedule="constant")
    assert {lr_at(s, total, const) for s in range(total)} == {0.3}


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


_FAULTS_SCRIPT = """
import resource, sys, torch
from incompat.training import tune_allocator
applied = tune_allocator()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):  # a training step's big activation buffer, allocated, touched and freed
    buffer = torch.empty(40 << 20, dtype=torch.uint8)
    buffer.fill_(1)
    del buffer
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_allocator_tuning_keeps_big_buffers_in_the_heap():
    import subprocess

    def run(flag: str) -> tuple[str, int]:
        env = {**os.environ, "INCOMPAT_TUNE_MALLOC": flag}
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0], int(out[1])

    applied_off, faults_off = run("0")
    applied_on, faults_on = run("1")
    assert (applied_off, applied_on) == ("False", "True")
    # default glibc: every 40 MB buffer is a fresh mmap, ~10k page faults each (512k measured for 50); tuned:
    # a few buffers' worth in all (31k-51k measured), however many steps follow
    assert faults_off > 50 * 5_000
    assert faults_on < faults_off / 5
