"""Export a checkpoint's U-Net to ONNX (fp32; dynamic batch, height and width), checked against PyTorch.

    pip install -r requirements-onnx.txt
    python export.py --checkpoint runs/NAME/best.pt --output model.onnx
    python predict.py --checkpoint model.onnx --input photos --output masks   # runs it with ONNX Runtime

The file's metadata holds the training size and channels, so predict.py needs no flags.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Sequence

import torch

import utils
from model import UNet
from task import make_task
from utils import UserError

TOLERANCE = 1e-4  # both fp32: only the summation order differs (BENCHMARKS.md); baked padding, wrong weights: far more
METADATA = ("height", "width", "in_channels", "out_channels")  # and "features", absent from older files


def needs(module: str, path: Path):
    """Import an ONNX package, or stop with one line that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{path}: needs {module}: pip install -r requirements-onnx.txt") from None


class OnnxModel:
    """An export.py file run by ONNX Runtime on the CPU, called like the UNet: float (N, C, H, W) -> logits."""

    device = torch.device("cpu")

    def __init__(self, path: Path, data: bytes | None = None):
        """From the file at path, or from its bytes (data) before they are written there."""
        ort = needs("onnxruntime", path)
        ort.set_default_logger_severity(4)  # its errors come back as exceptions: no log lines repeating them
        if data is None and not path.is_file():
            raise UserError(f"{path}: no such ONNX file")
        try:
            self.session = ort.InferenceSession(data or str(path), providers=["CPUExecutionProvider"])
            meta = self.session.get_modelmeta().custom_metadata_map
            height, width, in_channels, out_channels = (int(meta[key]) for key in METADATA)
        except Exception as e:  # a truncated or foreign file fails in onnxruntime's own ways, or lacks the metadata
            raise UserError(f"{path}: not an ONNX file written by export.py ({utils.one_line(e)})") from None
        self.size, self.config = (height, width), {"in_channels": in_channels, "out_channels": out_channels}
        if "features" in meta:  # what predict.py's --size check needs: the levels, each halving the size
            self.config["features"] = [int(n) for n in meta["features"].split()]

    def parameters(self):
        """No weights to train: one empty CPU tensor, for code that asks a model's parameters for its device."""
        return iter([torch.empty(0)])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().float().contiguous().cpu().numpy()  # fp32 whatever autocast is on around it
        return torch.from_numpy(self.session.run(None, {"images": x})[0])


def to_onnx(model: UNet, size: tuple[int, int], path: Path) -> bytes:
    """The model (fp32, in eval mode) as an ONNX file: dynamic batch, height and width, predict.py's metadata."""
    needs("onnxscript", path)  # torch.onnx's exporter (torch.export, dynamo=True) is written with it
    levels, channels = len(model.downs), model.config["in_channels"]
    # Traced at a size odd at every level, so _pad_to's padding stays in the graph (an even size drops it).
    x = torch.rand(1, channels, 2 ** (levels + 1) - 1, 2 ** (levels + 2) - 1)
    dims = {"x": {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}}
    proto = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=dims, verbose=False,
                              input_names=["images"], output_names=["logits"]).model_proto
    features = " ".join(map(str, model.config["features"]))
    for key, value in zip((*METADATA, "features"), (*size, channels, model.config["out_channels"], features)):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    return proto.SerializeToString()


def check(model: UNet, onnx_model: OnnxModel, path: Path) -> None:
    """Compare probabilities at the training size and an odd one (batch 2); UserError above TOLERANCE."""
    task, (height, width) = make_task(model.config["out_channels"]), onnx_model.size
    generator = torch.Generator().manual_seed(0)
    for batch, h, w in ((1, height, width), (2, height + 1, width + 3)):
        x = torch.rand(batch, model.config["in_channels"], h, w, generator=generator)
        with torch.inference_mode():
            try:
                difference = (task.probabilities(onnx_model(x)) - task.probabilities(model(x))).abs().max().item()
            except Exception as e:  # ONNX Runtime refuses the size, e.g. a shape baked in at the trace's
                raise UserError(f"{path}: not written: ONNX Runtime fails at {h}x{w}: {utils.one_line(e)}") from None
        print(f"self-check {batch}x{h}x{w}: largest |ONNX Runtime - PyTorch| probability {difference:.1e}")
        if not difference <= TOLERANCE:  # NaN fails too
            raise UserError(f"{path}: not written: ONNX Runtime differs from PyTorch by {difference:.1e} at "
                            f"{h}x{w} (tolerance {TOLERANCE:.0e}); please report it with torch's version")


def run(args: argparse.Namespace) -> None:
    """Export, check, then write the file (atomically: a failed check leaves none)."""
    state = utils.load_checkpoint(args.checkpoint)
    config = utils.training_config(state, args.checkpoint)
    model = utils.model_from_checkpoint(state, args.checkpoint).float().eval()
    data = to_onnx(model, (config.height, config.width), args.output)
    check(model, OnnxModel(args.output, data), args.output)
    try:
        with utils.atomic_write(args.output, "wb") as f:
            f.write(data)
    except OSError as e:
        raise UserError(f"{args.output}: cannot write the ONNX file ({e.strerror or e})") from None
    print(f"{args.output}: {len(data) / 1e6:.1f} MB, trained at {config.height}x{config.width}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a user error, reported as one line)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, metavar="FILE", required=True,
                        help="checkpoint written by train.py (runs/NAME/best.pt), or a run folder (its last.pt)")
    parser.add_argument("--output", type=Path, metavar="FILE.onnx", required=True,
                        help="the ONNX file to write; its name ends in .onnx, which is how predict.py knows it")
    args = parser.parse_args(argv)
    if not utils.is_onnx_file(args.output):
        parser.error(f"--output {args.output}: the name must end in .onnx, which is how predict.py tells the file "
                     f"from a checkpoint")
    return utils.run_program(lambda: run(args), status=2)


if __name__ == "__main__":
    raise SystemExit(main())
