"""The decoded-pair cache is shared by every DataLoader worker: after one epoch nothing is read from disk."""
from __future__ import annotations

import shutil

import numpy as np
import torch

import dataset as ds
import train
from carvana_files import write_tiny_carvana


def test_second_epoch_reads_nothing_from_disk_with_two_workers(tmp_path):
    data = write_tiny_carvana(tmp_path / "data", cars=2)
    args = train.parse_args(["--height", "32", "--width", "48", "--batch-size", "4", "--workers", "2"])
    loader = train.make_loader(ds.find_pairs(data), args, True, 0, 1, torch.device("cpu"))
    loader.sampler.set_epoch(1)
    first = sum(images.shape[0] for images, _ in loader)
    shutil.rmtree(data)  # a worker that has to decode again now fails
    loader.sampler.set_epoch(2)  # another order: indices land on other workers than in epoch 1
    second = sum(images.shape[0] for images, _ in loader)
    assert first == second == 32


def test_cached_pair_equals_decoded_pair_and_is_a_copy(tmp_path):
    data = write_tiny_carvana(tmp_path / "data", cars=1)
    pairs = ds.find_pairs(data)
    cached = ds.CarvanaDataset(pairs, 32, 48, cache=True)
    plain = ds.CarvanaDataset(pairs, 32, 48)
    first = cached.load(3)
    first[0][:] = 0  # an augmentation writing into what it got must not change the cache
    for got, want in zip(cached.load(3), plain.load(3)):
        assert np.array_equal(got, want)
