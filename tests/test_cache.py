"""The decoded-pair cache is shared by every DataLoader worker: after one epoch nothing is read from disk."""
from __future__ import annotations

import shutil
import signal

import numpy as np
import pytest
import torch

import dataset as ds
import train
from carvana_files import write_tiny_carvana


def test_second_epoch_reads_nothing_from_disk_with_two_workers(tmp_path):
    data = write_tiny_carvana(tmp_path / "data", cars=2)
    args, _ = train.parse_args(["--height", "32", "--width", "48", "--batch-size", "4", "--workers", "2"])
    loader = train.make_loader(ds.find_pairs(data), args, train.Setup.create(args), train=True)
    loader.sampler.set_epoch(1)
    first = sum(images.shape[0] for images, _ in loader)
    shutil.rmtree(data)  # a worker that has to decode again now fails
    loader.sampler.set_epoch(2)  # another order: indices land on other workers than in epoch 1
    second = sum(images.shape[0] for images, _ in loader)
    assert first == second == 32


def test_cached_pair_equals_decoded_pair_and_is_a_copy(tmp_path):
    data = write_tiny_carvana(tmp_path / "data", cars=1)
    pairs = ds.find_pairs(data)
    cached = ds.SegmentationDataset(pairs, 32, 48, cache=True)
    plain = ds.SegmentationDataset(pairs, 32, 48)
    first = cached.load(3)
    first[0][:] = 0  # an augmentation writing into what it got must not change the cache
    for got, want in zip(cached.load(3), plain.load(3)):
        assert np.array_equal(got, want)


class _WorkerSettings(torch.utils.data.Dataset):
    """Reports the OpenCV thread count and whether Ctrl-C is ignored, inside whichever process loads the item."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> tuple[int, bool]:
        import cv2
        return cv2.getNumThreads(), signal.getsignal(signal.SIGINT) == signal.SIG_IGN


@pytest.mark.parametrize("start_method", ["fork", "spawn"])  # spawn: macOS; forkserver (Python 3.14) alike
def test_loader_workers_run_opencv_single_threaded_and_leave_ctrl_c_to_train(tmp_path, monkeypatch, start_method):
    import cv2
    data = write_tiny_carvana(tmp_path / "data", cars=1)
    args, _ = train.parse_args(["--height", "32", "--width", "48", "--workers", "1"])
    monkeypatch.setattr(ds.multiprocessing, "get_start_method", lambda: start_method)
    threads = cv2.getNumThreads()
    cv2.setNumThreads(4)
    # Python's own handler, as in a terminal: a shell's background job (nohup ... &) starts with SIGINT ignored,
    # which forked workers would inherit.
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        # the pool in use, as after --workers 0
        cv2.warpAffine(np.zeros((512, 512), np.uint8), np.eye(2, 3), (512, 512))
        loader = train.make_loader(ds.find_pairs(data), args, train.Setup.create(args), train=True)
        # Its workers, forked from this process or spawned, must see one thread, and must not hang getting there.
        probe = torch.utils.data.DataLoader(_WorkerSettings(), num_workers=1, timeout=60, batch_size=None,
                                            worker_init_fn=loader.worker_init_fn, multiprocessing_context=start_method)
        opencv_threads, ctrl_c_ignored = zip(*probe)
        assert opencv_threads == (1, 1)
        # A spawned worker leaves Ctrl-C to train.py's clean stop; a forked one inherits its parent's handler.
        assert ctrl_c_ignored == ((start_method == "spawn"),) * 2
    finally:
        cv2.setNumThreads(threads)
        signal.signal(signal.SIGINT, handler)
