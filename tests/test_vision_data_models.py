"""Fashion-MNIST IDX parsing, the open-data split, and the small vision models."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from fedllm.data.vision import FILES, load_fashion_mnist, read_idx, split_open_data
from fedllm.models.vision import build_vision_model

REAL_ROOT = Path("/usr/share/datasets/fashion-mnist")
needs_real = pytest.mark.skipif(not (REAL_ROOT / FILES["train_x"]).is_file(),
                                reason="dataset-fashion-mnist is not installed")


def write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_tiny_dataset(root: Path) -> None:
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[1, 27, 27], images[2, 5, 7] = 255, 51, 102
    for split in ("train", "test"):
        write_idx(root / FILES[f"{split}_x"], 0x803, images)
        write_idx(root / FILES[f"{split}_y"], 0x801, np.array([7, 0, 9]))


@needs_real
def test_real_files_parse_to_expected_shapes_and_labels():
    # Execute
    data = load_fashion_mnist()

    # Assert
    assert data.train_x.shape == (60000, 1, 28, 28) and data.train_x.dtype == torch.float32
    assert data.test_x.shape == (10000, 1, 28, 28) and data.test_y.shape == (10000,)
    assert data.train_y.dtype == torch.int64
    assert float(data.train_x.min()) == 0.0 and float(data.train_x.max()) == 1.0
    assert torch.bincount(data.train_y).tolist() == [6000] * 10  # Fashion-MNIST is balanced
    assert torch.bincount(data.test_y).tolist() == [1000] * 10
    assert data.train_y[:5].tolist() == [9, 0, 0, 3, 0]  # ankle boot, T-shirt, T-shirt, dress, T-shirt


@needs_real
def test_loading_is_cached_per_root():
    assert load_fashion_mnist() is load_fashion_mnist(str(REAL_ROOT))


def test_synthetic_idx_files_round_trip_pixels_and_labels(tmp_path):
    # Prepare
    write_tiny_dataset(tmp_path)

    # Execute
    data = load_fashion_mnist(tmp_path)

    # Assert
    assert data.train_x.shape == (3, 1, 28, 28)
    assert data.train_y.tolist() == [7, 0, 9]
    assert float(data.train_x[0, 0, 0, 0]) == 1.0
    assert float(data.train_x[1, 0, 27, 27]) == pytest.approx(0.2)
    assert float(data.test_x[2, 0, 5, 7]) == pytest.approx(0.4)
    assert float(data.train_x.sum()) == pytest.approx(1.6)


def test_missing_directory_names_the_debian_package_and_the_file(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_fashion_mnist(tmp_path / "nowhere")
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert FILES["train_x"] in str(err.value)


def test_missing_single_file_is_named(tmp_path):
    # Prepare
    write_tiny_dataset(tmp_path)
    (tmp_path / FILES["test_y"]).unlink()

    # Execute / Assert
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        load_fashion_mnist(tmp_path)


def test_wrong_magic_number_is_rejected(tmp_path):
    # Prepare: a label file where an image file is expected
    path = tmp_path / "x.gz"
    write_idx(path, 0x801, np.arange(4))

    # Execute / Assert
    with pytest.raises(ValueError, match="magic number 0x00000801, expected 0x00000803"):
        read_idx(path, 0x803)


def test_truncated_idx_file_is_rejected(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as f:
        f.write((0x801).to_bytes(4, "big") + (5).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(ValueError, match="header says"):
        read_idx(path, 0x801)


def test_split_open_data_partitions_the_training_set_deterministically(tmp_path):
    # Prepare
    write_tiny_dataset(tmp_path)
    data = load_fashion_mnist(tmp_path)

    # Execute
    labeled, open_idx = split_open_data(data, n_open=2, seed=3)
    again = split_open_data(data, n_open=2, seed=3)

    # Assert
    assert len(open_idx) == 2 and len(labeled) == 1
    assert sorted(labeled.tolist() + open_idx.tolist()) == [0, 1, 2]
    assert np.array_equal(again[0], labeled) and np.array_equal(again[1], open_idx)


@needs_real
def test_split_open_data_paper_sizes():
    labeled, open_idx = split_open_data(load_fashion_mnist(), n_open=20000, seed=0)
    assert (len(labeled), len(open_idx)) == (40000, 20000)
    assert not set(labeled.tolist()) & set(open_idx.tolist())


def test_split_open_data_rejects_bad_sizes(tmp_path):
    write_tiny_dataset(tmp_path)
    data = load_fashion_mnist(tmp_path)
    with pytest.raises(ValueError, match="n_open must be in"):
        split_open_data(data, n_open=4, seed=0)


@pytest.mark.parametrize("name, hidden", [("lenet300100", 100), ("cnn", 64), ("resnet", 64)])
def test_models_map_images_to_logits_through_body_and_head(name, hidden):
    # Prepare
    torch.manual_seed(0)
    model = build_vision_model(name, num_classes=7)
    x = torch.rand(5, 1, 28, 28)

    # Execute
    code, logits = model.body(x), model(x)

    # Assert
    assert code.shape == (5, hidden)
    assert logits.shape == (5, 7)
    assert torch.allclose(model.head(code), logits)


def test_model_sizes():
    counts = {n: sum(p.numel() for p in build_vision_model(n).parameters())
              for n in ("lenet300100", "cnn", "resnet")}
    assert counts["lenet300100"] == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert 80_000 <= counts["cnn"] <= 150_000
    assert 30_000 <= counts["resnet"] <= 150_000


@pytest.mark.parametrize("name", ["lenet300100", "cnn", "resnet"])
def test_whole_state_is_parameters(name):
    model = build_vision_model(name)
    assert list(model.state_dict()) == [n for n, _ in model.named_parameters()]
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown vision model 'vgg'.*\['cnn', 'lenet300100', 'resnet'\]"):
        build_vision_model("vgg")
