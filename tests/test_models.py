import pytest
import torch

from incompat.models import MODEL_NAMES, build_model, count_parameters


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny forward passes: a second OpenMP thread only adds waiting when the other core is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_names():
    assert set(MODEL_NAMES) == {"small_cnn", "resnet32", "preact_resnet18"}


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="small_cnn.*resnet32.*preact_resnet18"):
        build_model("resnet50", 10)


@pytest.mark.parametrize("name, expected, tolerance", [
    ("resnet32", 464_154, 0.05),  # He et al. 2016: 0.46M
    ("preact_resnet18", 11_172_170, 0.02),  # 11.2M with a 10-class head
    ("small_cnn", 100_000, 0.15),  # "~100k" CPU default
])
def test_parameter_counts(name, expected, tolerance):
    assert count_parameters(build_model(name, 10)) == pytest.approx(expected, rel=tolerance)


def test_resnet32_shortcuts_are_option_a():
    model = build_model("resnet32", 10)
    # Option A adds no parameters: 31 3x3 convolutions and no 1x1 projection.
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 31 and all(c.kernel_size == (3, 3) for c in convs)


@pytest.mark.parametrize("name, dim", [("small_cnn", 128), ("resnet32", 64), ("preact_resnet18", 512)])
@pytest.mark.parametrize("size", [8, 9, 16])
def test_features_and_forward_on_any_size(name, dim, size):
    torch.manual_seed(0)
    model = build_model(name, 7, in_channels=3).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
        assert feats.shape == (2, dim)
        assert logits.shape == (2, 7)
        assert torch.allclose(model.classifier(feats), logits)


def test_width_and_in_channels():
    model = build_model("small_cnn", 4, in_channels=1, width=8).eval()
    assert model.features(torch.randn(3, 1, 12, 12)).shape == (3, 32)
    with pytest.raises(ValueError, match="width"):
        build_model("small_cnn", 4, width=0)
