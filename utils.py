"""What every program shares: user errors, atomic file writes, CPU counts, checkpoints, devices and
precision, the Dice/IoU/accuracy metrics, and the pictures a run saves."""
from __future__ import annotations

import argparse
import colorsys
import concurrent.futures
import contextlib
import functools
import json
import multiprocessing
import os
import pickle
import re
import shutil
import sys
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw

from model import UNet


# --- programs: user errors, files, CPUs -------------------------------------------------------

class UserError(Exception):
    """A problem the user can fix (a flag, a file, a folder), printed as one line that says how, no traceback."""


def run_program(run: Callable[[], int | None], status: int = 1) -> int:
    """run()'s exit status; a UserError is printed as 'error: ...' on stderr and exits with `status`."""
    try:
        return run() or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return status


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A temporary sibling of `path`, synced and renamed over it when the block succeeds: a kill, an error or a
    full disk leaves the old file (or none), never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": "", "encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the project's files are not
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_json(obj: Any, path: str | Path) -> None:
    """Write obj as indented JSON, atomically."""
    with atomic_write(path) as f:
        f.write(json.dumps(obj, indent=2) + "\n")


def usable_cpus() -> int:
    """The CPUs this process may run on (fewer than the machine's under taskset or a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parallel_map(function: Callable, jobs: list, workers: int | None = None, chunk: int = 32,
                 threads: bool = False) -> Iterator:
    """function over jobs, in order, in `workers` threads or processes (default: one per core) when there are
    `chunk` jobs for each, else here. Threads suit work that releases the GIL (PIL's decoders); processes are
    spawned, never forked: a fork can copy a lock another thread holds (torch's, tqdm's) and hang forever."""
    workers = min(usable_cpus() if workers is None else workers, len(jobs) // chunk)
    if workers < 2:
        yield from map(function, jobs)
    elif threads:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            yield from pool.map(function, jobs)
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            yield from pool.imap(function, jobs, chunksize=chunk)


def parse_size(text: str) -> tuple[int, int]:
    """'256x384' -> (256, 384): a height and a width in pixels."""
    try:
        height, width = (int(n) for n in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH, e.g. 256x384") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: height and width must be positive")
    return height, width


def check_input_sizes(sizes: Sequence[tuple[int, int]], model_config: dict[str, Any]) -> None:
    """Refuse, as a UserError, input sizes too small for the UNet's levels (each halves the size)."""
    smallest = 2 ** len(model_config.get("features", ()))  # an older ONNX file records none: not checked
    too_small = [size for size in sizes if min(size) < smallest]
    if too_small:
        raise UserError(f"--size {describe_sizes(too_small)} is too small for this UNet's "
                        f"{len(model_config['features'])} levels: height and width must be at least {smallest}")


def one_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message on one line (whitespace collapsed, cut at limit), else its type's name."""
    text = " ".join(str(error).split())
    return (text if len(text) <= limit else text[:limit - 3] + "...") or type(error).__name__


def describe_sizes(sizes: Sequence[tuple[int, int]]) -> str:
    """[(384, 576), (448, 672)] -> '384x576 + 448x672'."""
    return " + ".join(f"{height}x{width}" for height, width in sizes)


def plural(n: int, word: str) -> str:
    """plural(1, 'note') -> '1 note', plural(2, 'note') -> '2 notes'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


# --- checkpoints ------------------------------------------------------------------------------

class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, truncated, unsafe, or for another model."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write a checkpoint atomically: a kill or a full disk mid-save leaves the old file intact."""
    with atomic_write(path, "wb") as f:
        torch.save(state, f)


def replace_with_link(source: Path, path: Path) -> None:
    """Make `path` hold what `source` holds, atomically: a hard link, not a second write of the file (a copy where
    the filesystem has no hard links). Safe because files here are only ever replaced (atomic_write), never changed
    in place, so a later write of `source` leaves `path` as it was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
        os.replace(tmp, path)
    except OSError:
        with atomic_write(path, "wb") as f, open(source, "rb") as original:
            shutil.copyfileobj(original, f)
    finally:
        tmp.unlink(missing_ok=True)


def cpu_copy(state: Any) -> Any:
    """A copy of a checkpoint's state whose tensors are copies in CPU memory: training goes on changing the
    originals while the copy is written. Dicts, lists and tuples are copied; other values must be immutable."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        copy = type(state)((key, cpu_copy(value)) for key, value in state.items())
        if hasattr(state, "_metadata"):  # a module's state_dict keeps its layers' versions there
            copy._metadata = state._metadata
        return copy
    if isinstance(state, (list, tuple)):
        return type(state)(cpu_copy(value) for value in state)
    return state


class CheckpointWriter:
    """Writes checkpoints in a background thread, one at a time, so that training goes on while a large model's
    checkpoint goes to disk: save() copies the state to CPU memory and returns. torch.save releases the GIL
    while it writes. A failed write is announced on stderr at once and raised by the next save() or wait()."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict[str, Any], path: Path, links: Sequence[Path] = ()) -> None:
        """Write state to path (atomically), then make each of links the same file (best.pt: replace_with_link)."""
        self.wait()
        copy = cpu_copy(state)
        self._thread = threading.Thread(target=self._write, args=(copy, Path(path), [Path(p) for p in links]),
                                        name="checkpoint-writer")
        self._thread.start()

    def _write(self, state: dict[str, Any], path: Path, links: list[Path]) -> None:
        try:
            save_checkpoint(state, path)
            for link in links:
                replace_with_link(path, link)
        except BaseException as e:  # raised in the training thread by the next save() or wait()
            self._error = e
            print(f"\nwarning: could not write {path}: {one_line(e)}; the previous {path.name} is kept and the run "
                  f"will stop", file=sys.stderr)

    def wait(self, raise_error: bool = True) -> None:
        """Block until the last save is on disk; raise its error, if it failed (else it was only announced)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error


def is_onnx_file(path: str | Path) -> bool:
    """Whether a model file is export.py's ONNX file rather than a checkpoint: told by its name (.onnx)."""
    return Path(path).suffix.lower() == ".onnx"


def run_folder(checkpoint: str | Path) -> Path:
    """The run folder a checkpoint file lies in, or the folder itself when given one."""
    path = Path(checkpoint)
    return path if path.is_dir() else path.parent


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint (or a run folder's last.pt) with weights_only=True: a pickle that would run code is refused."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):  # torch.save's format: else the pickle loader's errors would call it unsafe
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (truncated, or another kind of file); train.py "
                              f"writes them as RUN/last.pt and RUN/best.pt")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # arbitrary bytes make torch's loader fail in many ways (KeyError, OSError, ...)
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
            raise CheckpointError(
                f"{path}: refused to load: it holds objects other than tensors and plain data (a pickle "
                f"that could run code). Only load checkpoints you trust and that this repository made.") from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or another format): "
                              f"{one_line(e)}") from None
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of this repository (expected the keys "
                              f"'model' and 'model_config', as train.py writes)")
    return state


def model_from_checkpoint(state: dict[str, Any], path: str | Path = "checkpoint") -> UNet:
    """Rebuild the UNet a checkpoint was trained with and load its weights."""
    try:
        model = UNet(**state["model_config"])
        model.load_state_dict(state["model"])
    except (TypeError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path}: its weights do not fit the model it describes "
                              f"({state.get('model_config')}): {one_line(e)}")
    return model


def training_config(state: dict[str, Any], path: str | Path) -> argparse.Namespace:
    """The flags a checkpoint was trained with (its size, classes, split seed...), as train.py's namespace."""
    config = state.get("config")
    if not isinstance(config, dict) or not {"height", "width"} <= config.keys():
        raise CheckpointError(f"{path}: has no training settings (config with height and width, as train.py writes)")
    return argparse.Namespace(**config)


# --- devices and precision --------------------------------------------------------------------

def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> cuda (this process's GPU under torchrun), then mps, then cpu; other names are checked."""
    mps = getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("mps" if mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (try auto, cpu, cuda, cuda:1 or mps)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device {name}: no such CUDA device here")
    if device.type == "mps" and not mps:
        raise UserError(f"--device {name}: MPS is not available here")
    return device


def autocast_dtype(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """The autocast dtype for amp ('auto', 'bf16', 'fp16', 'off') on this device; None means fp32."""
    if amp == "off":
        return None
    if amp in ("bf16", "fp16"):
        return torch.bfloat16 if amp == "bf16" else torch.float16
    if device.type == "cuda":
        # GPUs before Ampere only emulate bf16: use fp16 there (with a grad scaler when training).
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16_units() else None


@functools.cache  # /proc/cpuinfo does not change: read it once per process
def cpu_has_bf16_units() -> bool:
    """True on CPUs with AVX512-BF16 or AMX (as Linux lists them) while torch runs its AVX-512 kernels, which
    ATEN_CPU_CAPABILITY=avx2 turns off; elsewhere bf16 is emulated, slower than fp32."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: torch's own probe of the CPU
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def memory_format(device: torch.device, channels_last: bool | None = None) -> torch.memory_format:
    """channels_last when asked (True), else NCHW (False); by default channels_last on GPUs and CPUs with bf16
    units, NCHW on other CPUs, where a training step ran slower in channels_last."""
    if channels_last is None:
        channels_last = device.type != "cpu" or cpu_has_bf16_units()
    return torch.channels_last if channels_last else torch.contiguous_format


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's vector instructions and whether it has bf16 units: what the defaults follow."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.backends.cpu.get_cpu_capability()}, {'' if cpu_has_bf16_units() else 'no '}bf16 units)"
    return str(device)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for dtype, or a no-op context when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def process_group() -> Iterator[tuple[int, int, int]]:
    """(rank, world_size, local_rank); under torchrun, a process group that ends with the block."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield 0, 1, 0
        return
    # Imported before the group starts, not lazily where the report draws: imported while a group lives, it keeps
    # the group alive past destroy_process_group, and the group's gloo threads then abort the exit now and then.
    import torchvision.utils  # noqa: F401
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    try:
        yield dist.get_rank(), dist.get_world_size(), local_rank
    finally:
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes in place (nothing to do when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sync_buffers_from_rank0(net: torch.nn.Module) -> torch.nn.Module:
    """net, with rank 0's BatchNorm statistics on every rank; validation scores with it, not with DDP's wrapper,
    whose forward may broadcast buffers, a collective, while ranks hold different numbers of batches."""
    if dist.is_available() and dist.is_initialized():
        for buffer in net.buffers():
            dist.broadcast(buffer, src=0)
    return net


# --- metrics ----------------------------------------------------------------------------------

def sums_device(device: str | torch.device) -> torch.device:
    """Where a set's float64 running sums live: on the device, but on the CPU for MPS (no float64 there)."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


class BinaryMetrics:
    """Dice, IoU and pixel accuracy over a whole set of binary masks, never averaged per batch: over every pixel
    of the set, and as the mean of per-image scores (Kaggle's metric; an image empty in both scores 1)."""

    # Running sums, in this order, kept in one float64 tensor so ranks can all_reduce them at once.
    FIELDS = ("intersection", "predicted", "target", "correct", "pixels", "dice_sum", "iou_sum", "images")

    def __init__(self, device: str | torch.device = "cpu"):
        self.sums = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=sums_device(device))

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of boolean (or {0,1}) predictions and targets of shape (N, ...)."""
        pred, target = pred.bool().flatten(1), target.bool().flatten(1)
        if pred.device.type == "mps":  # no float64 there: counted on the CPU, where the sums are
            pred, target = pred.cpu(), target.cpu()
        inter = (pred & target).sum(1, dtype=torch.float64)
        p, t = pred.sum(1, dtype=torch.float64), target.sum(1, dtype=torch.float64)
        both_empty = (p + t) == 0
        dice = torch.where(both_empty, 1.0, 2 * inter / (p + t).clamp_min(1))
        iou = torch.where(both_empty, 1.0, inter / (p + t - inter).clamp_min(1))
        correct = (pred == target).sum(dtype=torch.float64)
        batch = torch.stack([inter.sum(), p.sum(), t.sum(), correct, inter.new_tensor(pred.numel()),
                             dice.sum(), iou.sum(), inter.new_tensor(len(pred))])
        self.sums += batch.to(self.sums.device)  # evaluate.py scores CPU masks into sums on the GPU

    def compute(self) -> dict[str, float]:
        """dice, iou, acc (global over the set) and mean_dice, mean_iou (per image, averaged)."""
        s = dict(zip(self.FIELDS, self.sums.tolist()))
        denom = s["predicted"] + s["target"]
        union = denom - s["intersection"]
        images = max(s["images"], 1.0)
        return {
            "dice": 2 * s["intersection"] / denom if denom else 1.0,
            "iou": s["intersection"] / union if union else 1.0,
            "acc": s["correct"] / s["pixels"] if s["pixels"] else 0.0,
            "mean_dice": s["dice_sum"] / images,
            "mean_iou": s["iou_sum"] / images,
            "images": int(s["images"]),
        }


class MulticlassMetrics:
    """Per-class and mean IoU, Dice and pixel accuracy from one confusion matrix over a whole set of label maps.

    Pixels whose target is ignore_index count nowhere. "dice"/"iou" are the means over the foreground classes
    1..N-1, "dice_all"/"iou_all" include background; a class absent from predictions and targets alike has
    no score (nan) and is left out of the means.
    """

    def __init__(self, classes: int, ignore_index: int = 255, device: str | torch.device = "cpu"):
        self.classes, self.ignore_index = classes, ignore_index
        # The confusion matrix (target x prediction, flattened), then the image count: one tensor to all_reduce.
        self.sums = torch.zeros(classes * classes + 1, dtype=torch.float64, device=sums_device(device))

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted and target class indices, both of shape (N, H, W)."""
        images = target.shape[0]
        pred, target = pred.long().flatten(), target.long().flatten()
        valid = (target != self.ignore_index) & (target >= 0) & (target < self.classes)
        counts = torch.bincount(target[valid] * self.classes + pred[valid], minlength=self.classes ** 2)
        self.sums[:-1] += counts.to(self.sums.device)  # int64 counts: no float64 where they were made (MPS)
        self.sums[-1] += images

    def compute(self) -> dict[str, Any]:
        """Means over foreground classes (dice, iou), including background (dice_all, iou_all), per class, acc."""
        cm = self.sums[:-1].view(self.classes, self.classes).cpu()  # row: the target class, column: the predicted
        hits, targets, predicted = cm.diag(), cm.sum(1), cm.sum(0)
        present = (targets + predicted) > 0
        nan = torch.full_like(hits, float("nan"))
        iou = torch.where(present, hits / (targets + predicted - hits).clamp_min(1), nan)
        dice = torch.where(present, 2 * hits / (targets + predicted).clamp_min(1), nan)

        def mean(scores: torch.Tensor) -> float:
            scores = scores[~scores.isnan()]
            return scores.mean().item() if len(scores) else 1.0  # nothing to find and nothing found: perfect

        pixels = cm.sum().item()
        return {
            "dice": mean(dice[1:]), "iou": mean(iou[1:]),
            "dice_all": mean(dice), "iou_all": mean(iou),
            "class_dice": dice.tolist(), "class_iou": iou.tolist(),
            "acc": hits.sum().item() / pixels if pixels else 0.0,
            "images": int(self.sums[-1].item()),
        }


def image_scores(pred: torch.Tensor, truth: torch.Tensor, classes: int = 1, ignore_index: int = 255) -> dict[str, Any]:
    """One (H, W) mask's metrics, computed as the set's are."""
    metrics = BinaryMetrics() if classes == 1 else MulticlassMetrics(classes, ignore_index)
    metrics.update(pred[None], truth[None])
    return metrics.compute()


# --- pictures: masks, panels, error maps -----------------------------------------------------

# Class colours: background black, then Sasha Trubetskoy's 20 distinct colours; more classes get hues
# spread by the golden ratio. Indices with no class (e.g. the ignore index 255) are white.
CLASS_COLOURS = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                 (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
                 (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
                 (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128))
CAR_COLOUR = (255, 45, 85)  # a binary mask's tint in overlays
# Error maps: magenta and cyan stay apart under the common colour blindnesses; true positives a faint green.
FP_COLOUR, FN_COLOUR, TP_COLOUR = (255, 0, 200), (0, 200, 255), (60, 180, 75)
PANEL_TITLES = ("photo", "ground truth", "prediction\nDice {dice:.4f}", "errors\nFP magenta, FN cyan")


def class_colours(classes: int) -> list[tuple[int, int, int]]:
    """A distinct RGB colour per class index 0..classes-1, class 0 (background) black."""
    hues = [colorsys.hsv_to_rgb((k * 0.618034) % 1, 0.75, 0.95) for k in range(len(CLASS_COLOURS), classes)]
    return list(CLASS_COLOURS[:classes]) + [tuple(round(c * 255) for c in rgb) for rgb in hues]


def class_palette(classes: int) -> list[int]:
    """A 256-entry PIL palette (flat RGB list): class colours, then white for indices that are no class."""
    colours = class_colours(classes)[:256]
    return [v for colour in colours + [(255, 255, 255)] * (256 - len(colours)) for v in colour]


def save_mask_png(labels: np.ndarray | torch.Tensor, path: str | Path, classes: int = 1) -> None:
    """A mask as a PNG, atomically: 0/255 grey for a binary one (classes=1), else a palette PNG whose
    pixel values are the class indices."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels).squeeze()
    image = Image.fromarray((labels > 0).astype(np.uint8) * 255 if classes == 1 else labels.astype(np.uint8))
    if classes > 1:
        image.putpalette(class_palette(classes))  # turns the 'L' image into 'P' with the same indices
    with atomic_write(path, "wb") as f:
        image.save(f, format="PNG")


def colorize(labels: torch.Tensor, classes: int = 1) -> torch.Tensor:
    """uint8 (3, H, W) picture of an (H, W) mask: white on black for a binary one, else in the class colours."""
    lut = torch.tensor(class_palette(classes), dtype=torch.uint8).view(256, 3)  # 1 class: black, then white
    return lut[labels.long().clamp(0, 255)].permute(2, 0, 1)


def overlay(image: torch.Tensor, labels: torch.Tensor, classes: int = 1, alpha: float = 0.45) -> torch.Tensor:
    """uint8 (3, H, W) image with an (H, W) binary mask, or each foreground class of a label map, tinted over it."""
    from torchvision.utils import draw_segmentation_masks
    if classes == 1:
        return draw_segmentation_masks(image, labels.bool()[None], alpha=alpha, colors=[CAR_COLOUR])
    masks = torch.stack([labels == k for k in range(1, classes)])  # background stays untinted
    return draw_segmentation_masks(image, masks, alpha=alpha, colors=class_colours(classes)[1:])


def error_codes(pred: torch.Tensor, truth: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """uint8 (H, W) of an (H, W) mask: 1 foreground predicted right (true positive), 2 foreground predicted as
    background (false negative), 3 a pixel given a foreground class it does not have (false positive), else 0."""
    pred, truth = pred.long(), truth.long()
    labelled = truth != ignore_index  # unlabelled pixels are 0
    wrong = torch.where(pred > 0, 3, 2) * ((pred != truth) & labelled)
    return (wrong + ((pred == truth) & labelled & (truth > 0))).byte()


def error_map(image: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """uint8 (3, h, w) image with error_codes drawn over it; larger codes are max-pooled to its size, the worst
    code winning, so that a one-pixel error still shows in a thumbnail."""
    from torchvision.utils import draw_segmentation_masks
    codes = F.adaptive_max_pool2d(codes[None].float(), image.shape[-2:])[0]
    out = draw_segmentation_masks(image, (codes == 1)[None], alpha=0.3, colors=[TP_COLOUR])
    for code, colour in ((2, FN_COLOUR), (3, FP_COLOUR)):
        out[:, codes == code] = torch.tensor(colour, dtype=torch.uint8, device=out.device)[:, None]
    return out


def save_prediction_images(images: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor, names: Sequence[str],
                           out_dir: str | Path, classes: int = 1, ignore_index: int = 255) -> None:
    """For each image write NAME_pred.png (the mask) and NAME_panel.png: photo | ground truth | prediction |
    errors, titled, with the image's Dice.

    targets and preds hold one (H, W) mask per image: booleans for a binary model, else class indices.
    """
    from torchvision.utils import make_grid
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for image, target, pred, name in zip(images.cpu(), targets.cpu(), preds.cpu(), names):
        image_u8 = (image.clamp(0, 1) * 255).round().to(torch.uint8).expand(3, -1, -1).clone()  # grey -> RGB
        target, pred = target.reshape(image.shape[-2:]), pred.reshape(image.shape[-2:])
        save_mask_png(pred, out_dir / f"{name}_pred.png", classes)
        panel = [image_u8, colorize(target, classes), colorize(pred, classes),
                 error_map(image_u8, error_codes(pred, target, ignore_index))]
        grid = make_grid(torch.stack(panel), nrow=len(panel), padding=4, pad_value=255)
        canvas = Image.new("RGB", (grid.shape[2], grid.shape[1] + 28), "white")
        canvas.paste(Image.fromarray(grid.permute(1, 2, 0).numpy()), (0, 28))
        dice = image_scores(pred, target, classes, ignore_index)["dice"]
        draw = ImageDraw.Draw(canvas)
        for k, title in enumerate(PANEL_TITLES):
            draw.text((4 + k * (image.shape[-1] + 4), 2), title.format(dice=dice), fill="black")
        with atomic_write(out_dir / f"{name}_panel.png", "wb") as f:
            canvas.save(f, format="PNG")
