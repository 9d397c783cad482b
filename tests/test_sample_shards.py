"""The samples are read one shard at a time (tasks.lib.samples.SampleShards): the same images in the same seed order
as the whole folder in memory (load_samples), each shard loaded once by a reader in seed order, a broken shard
named."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.lib.errors import DataError
from tasks.lib.samples import SampleShards, load_samples
from tasks.lib.files import write_npz
from tasks.lib.scoring import UInt8Images


def _folder(tmp_path, shards: dict[str, range], shape=(1, 4, 4)):
    rng = np.random.default_rng(0)
    for name, seeds in shards.items():
        images = rng.integers(0, 256, (len(seeds), *shape), dtype=np.uint8)
        write_npz(tmp_path / name, images=images, seeds=np.asarray(list(seeds), dtype=np.int64))
    return tmp_path


def test_shards_read_lazily_in_seed_order(tmp_path):
    # shard files whose seed ranges are not in file order: seed order decides, as in load_samples
    folder = _folder(tmp_path, {"shard_00000.npz": range(8, 12), "shard_00001.npz": range(0, 4),
                                "shard_00002.npz": range(4, 8)})
    images, seeds = load_samples(folder)
    s = SampleShards(folder)
    assert s.loads == 0 and len(s) == 12 and s.shape == (1, 4, 4)  # only the seeds were read
    assert s.seeds.tolist() == seeds.tolist() == list(range(12))
    assert np.array_equal(np.stack([s[i] for i in range(len(s))]), images)
    assert s.loads == 3  # in seed order: each shard once, one shard in memory at a time

    # What the feature extractor reads: the same tensors from the shards as from the array.
    lazy, whole = UInt8Images(SampleShards(folder)), UInt8Images(images)
    assert len(lazy) == len(whole) == 12
    for i in range(12):
        a, b = lazy[i], whole[i]
        assert a.shape == (3, 4, 4) and a.dtype == b.dtype and bool((a == b).all()), i


def test_a_bad_shard_is_named(tmp_path):
    with pytest.raises(DataError, match="no sample shards"):
        SampleShards(tmp_path)
    folder = _folder(tmp_path, {"shard_00000.npz": range(0, 4)})
    _folder(tmp_path, {"shard_00001.npz": range(4, 8)}, shape=(1, 8, 8))
    s = SampleShards(folder)
    s[0]
    with pytest.raises(DataError, match=r"shard_00001.npz: images are uint8 \(1, 8, 8\), the other shards' are"):
        s[5]
    (tmp_path / "shard_00002.npz").write_bytes(b"not an npz")
    with pytest.raises(DataError, match="shard_00002.npz: unreadable sample shard"):
        SampleShards(folder)
