import gzip

import numpy as np
import pytest
import torch

from diffquant.data import DataNotFoundError, load_fashion_mnist, read_idx
from diffquant.data.fashion_mnist import DEBIAN_DIR, ENV_VAR, default_data_dir, to_model_range, to_uint8
from tests.conftest import write_idx


def test_read_idx_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr)
    write_idx(tmp_path / "b", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "b"), arr)


def test_read_idx_multibyte_is_big_endian(tmp_path):
    arr = np.array([1, 256, 70000], dtype=np.int32)
    write_idx(tmp_path / "c.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "c.gz"), arr)


def test_load_split(fake_fashion_dir):
    x, y = load_fashion_mnist("train", fake_fashion_dir)
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.uint8
    assert y.tolist() == [i % 10 for i in range(64)]
    x, y = load_fashion_mnist("test", fake_fashion_dir)
    assert x.shape == (32, 1, 28, 28)


def test_env_var_overrides_default(fake_fashion_dir, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(fake_fashion_dir))
    assert default_data_dir() == fake_fashion_dir
    assert load_fashion_mnist("test")[0].shape[0] == 32
    monkeypatch.delenv(ENV_VAR)
    assert default_data_dir() == DEBIAN_DIR


def test_missing_directory_names_package_and_override(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_fashion_mnist("train", tmp_path / "nope")
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and ENV_VAR in msg and "--data-dir" in msg


def test_missing_file(fake_fashion_dir):
    (fake_fashion_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError, match="not found"):
        load_fashion_mnist("test", fake_fashion_dir)


def test_truncated_file(fake_fashion_dir):
    path = fake_fashion_dir / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataNotFoundError, match="truncated"):
        load_fashion_mnist("train", fake_fashion_dir)


def test_cut_gzip_stream(fake_fashion_dir):
    path = fake_fashion_dir / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DataNotFoundError, match="corrupt"):
        load_fashion_mnist("train", fake_fashion_dir)


def test_not_an_idx_file(fake_fashion_dir):
    (fake_fashion_dir / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"hello world, not idx"))
    with pytest.raises(DataNotFoundError, match="magic"):
        load_fashion_mnist("train", fake_fashion_dir)


def test_mismatched_counts(fake_fashion_dir):
    write_idx(fake_fashion_dir / "t10k-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(DataNotFoundError, match="do not match"):
        load_fashion_mnist("test", fake_fashion_dir)


def test_unknown_split(fake_fashion_dir):
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", fake_fashion_dir)


def test_range_conversion_roundtrip():
    u8 = torch.arange(256, dtype=torch.uint8)
    x = to_model_range(u8)
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(x), u8)
