"""genray.datasets: the embedded datasets, their export as PNG files, and reading an image prefix back."""

import numpy as np
import pytest

from genray import datasets, images, storage


@pytest.fixture(scope="module")
def digits():
    return datasets.load_embedded("digits")


def _split_counts(keys):
    return {split: sum(key.startswith(split + "/") for key in keys) for split in ("train", "test")}


def test_digits_are_mnist_like(digits):
    data, labels, keys = digits
    assert len(data) == len(labels) == len(keys) == 1797
    assert all(image.shape == (28, 28, 1) and image.dtype == np.uint8 for image in data)
    assert set(labels) == set(range(10))
    stack = np.stack(data)
    assert stack.max() > 200 and np.all(stack[:, :4] == 0) and np.all(stack[:, :, -4:] == 0)  # padded border
    assert len(set(keys)) == len(keys)
    assert keys[0] == "test/0/0000.png" and keys[1] == f"train/{labels[1]}/0001.png"
    assert _split_counts(keys) == {"train": 1437, "test": 360}
    assert datasets.labels_from_keys(keys) == labels


def test_faces():
    data, labels, keys = datasets.load_embedded("faces")
    assert labels is None and len(data) == len(keys) == 100
    assert all(image.shape == (25, 25, 1) and image.dtype == np.uint8 for image in data)
    assert len(set(keys)) == 100 and keys[:2] == ["test/000.png", "train/001.png"]
    assert _split_counts(keys) == {"train": 80, "test": 20}


def test_photos():
    data, labels, keys = datasets.load_embedded("photos")
    assert labels is None and len(data) == len(keys) >= 4
    assert all(image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8 for image in data)
    assert len(set(keys)) == len(keys)
    assert {"test/chelsea.png", "test/flower.png", "train/china.png", "train/astronaut.png"} <= set(keys)
    assert _split_counts(keys)["test"] == 2
    assert dict(zip(keys, (d.shape for d in data)))["test/flower.png"] == (427, 640, 3)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="digits, faces, photos"):
        datasets.load_embedded("cifar")


def test_export_and_read_back_local(tmp_path):
    root = str(tmp_path / "faces")
    uris = datasets.export_dataset("faces", root, split="test")
    assert len(uris) == 20 and uris[0] == root + "/test/000.png"
    data, _, keys = datasets.load_embedded("faces")
    read, read_keys = datasets.read_image_prefix(root)
    assert read_keys == [k for k in keys if k.startswith("test/")]
    expected = dict(zip(keys, data))
    for key, image in zip(read_keys, read):
        np.testing.assert_array_equal(image, expected[key])  # PNG is lossless; 1 channel kept with channels=None
    read3, _ = datasets.read_image_prefix(root, channels=3, limit=3)
    assert len(read3) == 3 and read3[0].shape == (25, 25, 3)


def test_export_digits_labels_round_trip(tmp_path):
    root = str(tmp_path / "digits")
    datasets.export_dataset("digits", root, split="test")
    _, keys = datasets.read_image_prefix(root + "/test", limit=30)
    labels = datasets.labels_from_keys(keys)  # '<label>/<file>' under a split folder works too
    assert labels is not None and len(labels) == 30 and all(0 <= label <= 9 for label in labels)


def test_export_bad_split(tmp_path):
    with pytest.raises(ValueError, match="train, test"):
        datasets.export_dataset("faces", str(tmp_path), split="val")


def test_read_empty_prefix_names_uri(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=str(tmp_path)):
        datasets.read_image_prefix(str(tmp_path))


def test_read_undecodable_file_names_key(tmp_path):
    storage.write_bytes(str(tmp_path / "a" / "good.png"), images.encode_png(np.zeros((4, 4, 3), np.uint8)))
    storage.write_bytes(str(tmp_path / "a" / "bad.jpg"), b"this is not a jpeg")
    with pytest.raises(images.ImageError, match="a/bad.jpg: not an image"):
        datasets.read_image_prefix(str(tmp_path))


def test_labels_from_keys_layouts():
    assert datasets.labels_from_keys(["train/3/0001.png", "test/7/0002.png"]) == [3, 7]
    assert datasets.labels_from_keys(["3/0001.png"]) == [3]
    assert datasets.labels_from_keys(["train/001.png"]) is None
    assert datasets.labels_from_keys(["train/3/0001.png", "x.png"]) is None
    assert datasets.labels_from_keys([]) is None


def test_export_and_read_back_s3(s3_bucket):
    prefix = f"{s3_bucket}/data/photos"
    uris = datasets.export_dataset("photos", prefix, split="test")
    assert uris == [f"{prefix}/test/chelsea.png", f"{prefix}/test/flower.png"]
    read, keys = datasets.read_image_prefix(prefix, channels=3)
    assert keys == ["test/chelsea.png", "test/flower.png"]
    data, _, all_keys = datasets.load_embedded("photos")
    np.testing.assert_array_equal(read[1], data[all_keys.index("test/flower.png")])
