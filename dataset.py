"""Carvana data: pairing photos with masks, the car-wise split, augmentations, the Dataset,
a synthetic Carvana-format generator, the dataset check and the Kaggle download.

Kaggle's layout, once `train.zip` and `train_masks.zip` are extracted into DIR:
    DIR/train/{car_id}_{view:02d}.jpg          1918x1280 RGB photos, 16 views per car
    DIR/train_masks/{car_id}_{view:02d}_mask.gif  palette GIFs holding 0 (background) and 1 (car)

Command line:
    python dataset.py synthetic --out data/synthetic      # generate the synthetic default
    python dataset.py download --out data/carvana         # fetch Carvana from Kaggle
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_DIR = "train"
MASK_DIR = "train_masks"
MASK_SUFFIX = "_mask.gif"
IMAGE_EXTENSIONS = (".jpg", ".jpeg")


# ---------------------------------------------------------------------------------------------
# Carvana files, pairing and the car-wise split
# ---------------------------------------------------------------------------------------------

def is_hidden(path: Path) -> bool:
    """True for files the OS leaves behind (.DS_Store, macOS '._X.jpg' forks)."""
    return path.name.startswith(".")


def car_id(image_path: str | Path) -> str:
    """The car a Carvana photo shows: '0cdf5b5d0ce1_07.jpg' -> '0cdf5b5d0ce1'."""
    return Path(image_path).stem.rsplit("_", 1)[0]


def mask_path_for(image_path: Path, data_dir: Path) -> Path:
    """Where Kaggle puts the mask of a photo: train/X.jpg -> train_masks/X_mask.gif."""
    return data_dir / MASK_DIR / f"{image_path.stem}{MASK_SUFFIX}"


def list_images(data_dir: str | Path) -> list[Path]:
    """The photos in DIR/train, sorted by name, hidden files ignored."""
    image_dir = Path(data_dir) / IMAGE_DIR
    if not image_dir.is_dir():
        return []
    return sorted(p for p in image_dir.iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(p))


def find_pairs(data_dir: str | Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs matched by name, never by position; a photo without its mask is an error."""
    data_dir = Path(data_dir)
    pairs, missing = [], []
    for image in list_images(data_dir):
        mask = mask_path_for(image, data_dir)
        (pairs if mask.is_file() else missing).append((image, mask))
    if missing:
        names = ", ".join(str(m) for _, m in missing[:5])
        raise FileNotFoundError(
            f"{len(missing)} photo(s) in {data_dir / IMAGE_DIR} have no mask, e.g. {names}. "
            f"Each X.jpg needs {MASK_DIR}/X{MASK_SUFFIX}: re-extract train_masks.zip or remove the photos.")
    return pairs


def split_by_car(pairs: Sequence[tuple[Path, Path]], val_cars: float, seed: int) -> tuple[list[str], list[str]]:
    """Split car ids into (train, val) so that all views of a car fall on one side.

    val_cars >= 1 is a number of cars, 0 < val_cars < 1 a fraction of them; at least one car is held
    out and at least one kept for training. Deterministic for a given seed and set of cars.
    """
    cars = sorted({car_id(image) for image, _ in pairs})
    if len(cars) < 2:
        raise ValueError(f"need at least 2 cars to split into train and validation, found {len(cars)}")
    n_val = round(val_cars * len(cars)) if 0 < val_cars < 1 else int(val_cars)
    n_val = min(max(n_val, 1), len(cars) - 1)
    shuffled = cars[:]
    random.Random(seed).shuffle(shuffled)
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


def pairs_of_cars(pairs: Sequence[tuple[Path, Path]], cars: Sequence[str]) -> list[tuple[Path, Path]]:
    """The pairs whose car is in `cars`, in their original order."""
    keep = set(cars)
    return [pair for pair in pairs if car_id(pair[0]) in keep]


# ---------------------------------------------------------------------------------------------
# Loading and augmentations
# ---------------------------------------------------------------------------------------------

def load_image(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """An RGB photo as uint8 (H, W, 3); with size=(height, width), resized to it.

    JPEGs are decoded at a reduced scale when the target is small (PIL's draft mode lets libjpeg skip
    most of the work: about 8x faster for Carvana photos at 160x240).
    """
    with Image.open(path) as img:
        if size is not None:
            img.draft("RGB", (size[1], size[0]))  # keeps at least the requested size
        img = img.convert("RGB")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(img)


def load_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A binary mask as uint8 {0, 1} (H, W); with size=(height, width), resized to it (area-weighted)."""
    with Image.open(path) as img:
        mask = (np.asarray(img.convert("L")) > 0).astype(np.uint8)
    if size is not None and mask.shape != tuple(size):
        # Resize coverage 0..255 with antialiasing, then threshold at half coverage.
        resized = Image.fromarray(mask * 255).resize((size[1], size[0]), Image.BILINEAR)
        mask = (np.asarray(resized) >= 128).astype(np.uint8)
    return mask


def train_transforms(height: int, width: int):
    """Training augmentations: resize, horizontal flip, small shift/scale/rotate, colour jitter."""
    import albumentations as A
    return A.Compose([
        A.Resize(height, width),
        A.HorizontalFlip(p=0.5),
        A.Affine(translate_percent=(-0.05, 0.05), scale=(0.9, 1.1), rotate=(-5, 5),
                 border_mode=0, fill=0, fill_mask=0, p=0.5),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
    ])


def val_transforms(height: int, width: int):
    """Validation: resize only, no augmentation."""
    import albumentations as A
    return A.Compose([A.Resize(height, width)])


def to_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (H, W, 3) image and {0,1} (H, W) mask -> float (3, H, W) in [0, 1] and float (1, H, W)."""
    image_t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
    mask_t = torch.from_numpy(np.ascontiguousarray(mask)).unsqueeze(0).float()
    return image_t, mask_t


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------

class CarvanaDataset(Dataset):
    """Photo/mask pairs, decoded straight to the training size, then augmented together."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], height: int, width: int, transform=None):
        self.pairs = list(pairs)
        self.size = (height, width)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        image = load_image(image_path, self.size)
        mask = load_mask(mask_path, self.size)
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return to_tensors(image, mask)


# ---------------------------------------------------------------------------------------------
# Synthetic Carvana-format generator
# ---------------------------------------------------------------------------------------------

# A car is a few convex prisms (lower body, cabin, door mirrors) and four wheel cylinders, in car
# coordinates: x forward, y to the car's left, z up, in metres, origin on the floor under its middle.
# It turns on the spot in front of an orthographic camera looking down at a small angle, and is drawn
# with the painter's algorithm in a fixed order instead of a depth sort: with the camera above the
# floor, of two points on one line of sight the higher one is the nearer, so the wheels' parts below
# the body lie behind it, and the cabin and mirrors, all above the body, lie in front of it. Inside one
# convex prism, drawing only the faces turned towards the camera is enough.

SYNTHETIC_VIEWS = 16
SYNTHETIC_MANIFEST = "synthetic.json"
SYNTHETIC_VERSION = 1  # bump when the drawing changes, so an older folder is not reused as current
_LIGHT = np.array([-0.35, -0.55, 0.76]) / np.linalg.norm([-0.35, -0.55, 0.76])  # camera frame (right, away, up)
_AMBIENT, _DIFFUSE = 0.55, 0.5
_TYRE = (30.0, 30.0, 32.0)
_WHEEL_WELL = (14.0, 14.0, 16.0)
_GLASS = (38.0, 45.0, 54.0)
_PAINTS = ((160, 25, 30), (115, 20, 28), (25, 55, 140), (20, 30, 70), (30, 90, 55), (215, 175, 40),
           (210, 95, 30), (110, 80, 55), (200, 190, 160), (70, 110, 150))
_BODY_STYLES = {  # (low, high) ranges in metres; rear_rake is the rear window's run over the cabin's rise
    "sedan": dict(length=(4.4, 5.0), clearance=(0.14, 0.2), belt=(0.85, 0.98), roof=(0.42, 0.52),
                  boot=(0.7, 1.0), rear_rake=(1.0, 1.6), wheel=(0.3, 0.35)),
    "hatchback": dict(length=(3.8, 4.4), clearance=(0.14, 0.2), belt=(0.85, 0.98), roof=(0.46, 0.58),
                      boot=(0.0, 0.1), rear_rake=(0.25, 0.6), wheel=(0.29, 0.34)),
    "suv": dict(length=(4.3, 4.9), clearance=(0.22, 0.3), belt=(1.0, 1.12), roof=(0.5, 0.62),
                boot=(0.0, 0.08), rear_rake=(0.1, 0.35), wheel=(0.34, 0.4)),
    "coupe": dict(length=(4.2, 4.7), clearance=(0.12, 0.16), belt=(0.8, 0.9), roof=(0.36, 0.45),
                  boot=(0.4, 0.7), rear_rake=(1.5, 2.2), wheel=(0.31, 0.35)),
}


class _Face:
    """A flat convex polygon of a car part, with the polygons painted on it (windows, lights, wheels)."""

    __slots__ = ("points", "normal", "color", "decals")

    def __init__(self, points: np.ndarray, normal: np.ndarray, color: np.ndarray) -> None:
        self.points = points  # (k, 3), car coordinates
        self.normal = normal  # outward, unit length
        self.color = color
        self.decals: list[tuple[np.ndarray, np.ndarray]] = []

    def paint(self, points: np.ndarray, color: Sequence[float]) -> None:
        """Add a polygon drawn over the face, in the face's shade."""
        self.decals.append((points, np.asarray(color, dtype=float)))


def _prism(profile: Sequence[tuple[float, float]], y0: float, y1: float, color: np.ndarray) -> list[_Face]:
    """The faces of a convex counter-clockwise (x, z) profile extruded from y0 to y1 > y0.

    Returns the caps at y1 and y0, then one rectangle per profile edge i -> i+1 with corners
    (p_i, y0), (p_i, y1), (p_i+1, y1), (p_i+1, y0), the order `_patch` relies on.
    """
    xz = np.asarray(profile, dtype=float)
    faces = [_Face(_at_y(xz, y1), np.array([0.0, 1.0, 0.0]), color),
             _Face(_at_y(xz, y0), np.array([0.0, -1.0, 0.0]), color)]
    for (ax, az), (bx, bz) in zip(xz, np.roll(xz, -1, axis=0)):
        normal = np.array([bz - az, 0.0, ax - bx])  # right of a counter-clockwise edge is outside
        corners = np.array([[ax, y0, az], [ax, y1, az], [bx, y1, bz], [bx, y0, bz]])
        faces.append(_Face(corners, normal / np.linalg.norm(normal), color))
    return faces


def _patch(face: _Face, u: tuple[float, float], v: tuple[float, float]) -> np.ndarray:
    """The part u x v of a prism's edge face; u runs across the car (y0 -> y1), v along the edge."""
    origin, across, along = face.points[0], face.points[1] - face.points[0], face.points[3] - face.points[0]
    corners = ((u[0], v[0]), (u[1], v[0]), (u[1], v[1]), (u[0], v[1]))
    return np.array([origin + a * across + b * along for a, b in corners])


def _at_y(xz: np.ndarray, y: float) -> np.ndarray:
    """(k, 2) profile points (x, z) -> (k, 3) points in the plane at y."""
    return np.column_stack([xz[:, 0], np.full(len(xz), y), xz[:, 1]])


def _disc(x: float, z: float, radius: float, y: float, floor: float | None = None) -> np.ndarray:
    """A circle in the plane at y, as a polygon; with floor, its points below z=floor are raised to it."""
    angles = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)
    zs = z + radius * np.sin(angles)
    if floor is not None:
        zs = np.maximum(zs, floor)
    return _at_y(np.column_stack([x + radius * np.cos(angles), zs]), y)


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """The convex hull of (n, 2) points, counter-clockwise (Andrew's monotone chain)."""
    pts = sorted(map(tuple, points.tolist()))

    def half(sequence: list[tuple[float, float]]) -> list[tuple[float, float]]:
        chain: list[tuple[float, float]] = []
        for p in sequence:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    return np.array(half(pts) + half(pts[::-1]))


def _body_colour(rng: np.random.Generator, grey: float) -> np.ndarray:
    """A car's paint: often a grey whose lit faces come out near the backdrop's, else white, black, a colour."""
    pick = rng.random()
    if pick < 0.3:
        base = np.full(3, grey / 0.85 + rng.uniform(-25, 10))  # 0.85: a typical face's shade
    elif pick < 0.45:
        base = np.full(3, rng.uniform(225, 250))
    elif pick < 0.6:
        base = np.full(3, rng.uniform(15, 60))
    else:
        base = np.array(_PAINTS[rng.integers(len(_PAINTS))], dtype=float)
    return np.clip(base + rng.normal(0, 6, 3), 0, 255)


def _backdrop(rng: np.random.Generator, width: int, height: int, horizon: float, grey: float) -> np.ndarray:
    """A studio backdrop as float32 (H, W, 3): a light grey gradient wall over the floor, faint noise."""
    y = (np.arange(height, dtype=np.float32) + 0.5) / height
    h0 = horizon / height
    wall = grey + 12 - 16 * y / h0                          # lit from above
    floor = grey - 18 + 20 * (y - h0) / (1 - h0)            # darkest where it meets the wall
    cove = 1 / (1 + np.exp(-(y - h0) / 0.01))               # the curved join, soft rather than a line
    column = wall * (1 - cove) + floor * cove
    x = (np.arange(width, dtype=np.float32) + 0.5) / width * 2 - 1
    light = column[:, None] * (1 - 0.08 * x[None, :] ** 2)  # a little darker towards the sides
    tint = 1 + rng.normal(0, 0.012, 3).astype(np.float32)
    noise = rng.standard_normal((height, width, 1), dtype=np.float32) * 1.5
    return light[:, :, None] * tint + noise


class _SyntheticCar:
    """One procedurally drawn car in its studio, seen by a fixed camera as it turns on the spot."""

    def __init__(self, rng: np.random.Generator, width: int, height: int) -> None:
        self.width, self.height = width, height
        style = _BODY_STYLES[list(_BODY_STYLES)[rng.integers(len(_BODY_STYLES))]]
        grey = rng.uniform(195, 228)  # the backdrop's
        paint = _body_colour(rng, grey)
        self._build_body(rng, style, paint)
        self._build_cabin(rng, style, paint)
        self._place_camera(rng)
        self.shadow_strength = rng.uniform(0.35, 0.55)
        self.backdrop = _backdrop(rng, width, height, self.horizon, grey)

    def _build_body(self, rng: np.random.Generator, style: dict, paint: np.ndarray) -> None:
        """The lower body with its lights, and the wheels painted on its sides."""
        u = rng.uniform
        self.car_length, self.car_width = u(*style["length"]), u(1.65, 1.95)
        half_l, half_w = self.car_length / 2, self.car_width / 2
        clearance, self.belt = u(*style["clearance"]), u(*style["belt"])
        bonnet_front = self.belt - u(0.03, 0.12)
        nose = clearance + (bonnet_front - clearance) * u(0.45, 0.65)
        tail = clearance + (self.belt - clearance) * u(0.4, 0.6)
        front_under, front_set, rear_under, rear_set = u(0.12, 0.3), u(0.08, 0.25), u(0.1, 0.25), u(0.05, 0.3)
        self.boot_back = -half_l + rear_set
        self.screen_base = half_l - front_set - u(0.8, 1.3)
        # Faces: 0, 1 the sides, then one per profile edge: 2 underside, 3 front bumper, 4 front (lamps,
        # grille), 5 bonnet, 6 top (under the cabin and boot), 7 back of the boot lid, 8 rear bumper.
        body = _prism([(-half_l + rear_under, clearance), (half_l - front_under, clearance), (half_l, nose),
                       (half_l - front_set, bonnet_front), (self.screen_base, self.belt),
                       (self.boot_back, self.belt), (-half_l, tail)], -half_w, half_w, paint)
        lamp_low = u(0.15, 0.3)
        for side in ((0.05, 0.27), (0.73, 0.95)):
            body[4].paint(_patch(body[4], side, (lamp_low, lamp_low + 0.5)), (235, 232, 215))  # headlights
            body[7].paint(_patch(body[7], side, (0.15, 0.65)), (165, 18, 24))  # tail lights
        body[4].paint(_patch(body[4], (0.34, 0.66), (0.15, 0.75)), (24, 24, 26))  # grille
        body[3].paint(_patch(body[3], (0.25, 0.75), (0.3, 0.7)), (30, 30, 32))  # air intake
        body[8].paint(_patch(body[8], (0.38, 0.62), (0.2, 0.6)), (225, 225, 215))  # number plate

        # Wheels (and their arches) fit under the bonnet and inside the flat underside, so the body hides
        # their upper half and what is painted on its sides stays inside the car's silhouette.
        radius = min(u(*style["wheel"]), (bonnet_front - 0.1) / 2)
        tread = u(0.2, 0.28)
        axles = (half_l - max(front_under, front_set) - radius - u(0.05, 0.25),
                 -half_l + max(rear_under, rear_set) + radius + u(0.1, 0.3))
        rim = np.full(3, u(150, 205)) if rng.random() < 0.7 else np.full(3, u(40, 70))
        self.wheels = []  # (outer circle, inner circle, centre)
        for side, cap in ((1, body[0]), (-1, body[1])):
            for x in axles:
                outer_y, inner_y = side * half_w, side * (half_w - tread)
                self.wheels.append((_disc(x, radius, radius, outer_y), _disc(x, radius, radius, inner_y),
                                    np.array([x, (outer_y + inner_y) / 2, radius])))
                cap.paint(_disc(x, radius, radius * 1.1, outer_y, floor=clearance), _WHEEL_WELL)
                cap.paint(_disc(x, radius, radius, outer_y), _TYRE)
                cap.paint(_disc(x, radius, radius * 0.62, outer_y), rim)
                cap.paint(_disc(x, radius, radius * 0.16, outer_y), rim * 0.5)
        self.body = body

    def _build_cabin(self, rng: np.random.Generator, style: dict, paint: np.ndarray) -> None:
        """The cabin with its windows, and the door mirrors."""
        u = rng.uniform
        base_rear = self.boot_back + u(*style["boot"])
        rise = u(*style["roof"])
        self.roof = self.belt + rise
        runs = np.array([rise * u(1.2, 1.9), rise * u(*style["rear_rake"])])  # windscreen, rear window
        runs *= min(1.0, (self.screen_base - base_rear - 0.7) / runs.sum())  # keep a roof >= 0.7 m long
        top_front, top_rear = self.screen_base - runs[0], base_rear + runs[1]
        half_w = self.car_width * u(0.78, 0.9) / 2
        # Faces: 0, 1 the sides, 2 floor, 3 windscreen, 4 roof, 5 rear window.
        cabin = _prism([(base_rear, self.belt), (self.screen_base, self.belt), (top_front, self.roof),
                        (top_rear, self.roof)], -half_w, half_w, paint)
        cabin[3].paint(_patch(cabin[3], (0.06, 0.94), (0.06, 0.93)), _GLASS)  # windscreen
        cabin[5].paint(_patch(cabin[5], (0.07, 0.93), (0.07, 0.9)), _GLASS)   # rear window

        def front_x(z: float) -> float:
            return self.screen_base - runs[0] * (z - self.belt) / rise

        def rear_x(z: float) -> float:
            return base_rear + runs[1] * (z - self.belt) / rise

        low, high, inset, pillar = self.belt + 0.12 * rise, self.roof - 0.1 * rise, 0.06, 0.05
        middle = top_rear + (top_front - top_rear) * u(0.35, 0.55)
        windows = [np.array([(middle + pillar, low), (front_x(low) - inset, low), (front_x(high) - inset, high),
                             (middle + pillar, high)]),
                   np.array([(rear_x(low) + inset, low), (middle - pillar, low), (middle - pillar, high),
                             (rear_x(high) + inset, high)])]
        for cap, y in ((cabin[0], half_w), (cabin[1], -half_w)):
            for window in windows:
                cap.paint(_at_y(window, y), _GLASS)
        self.cabin = cabin

        # Door mirrors stand beside the cabin's front, above the belt line like the cabin.
        x = front_x(self.belt + 0.19) - 0.1 - u(0.0, 0.1)
        mirror = [(x - 0.1, self.belt + 0.06), (x + 0.08, self.belt + 0.05), (x + 0.06, self.belt + 0.19),
                  (x - 0.1, self.belt + 0.18)]
        reach = u(0.14, 0.2)
        colour = paint if rng.random() < 0.7 else np.array(_TYRE)
        self.mirrors = {1: _prism(mirror, half_w, half_w + reach, colour),
                        -1: _prism(mirror, -half_w - reach, -half_w, colour)}

    def _place_camera(self, rng: np.random.Generator) -> None:
        """Elevation, scale and centre so that every view fits the frame, and where the floor meets the wall."""
        u = rng.uniform
        self.elevation = np.radians(u(8, 17))
        cos_e, sin_e = np.cos(self.elevation), np.sin(self.elevation)
        diagonal = np.hypot(self.car_length, self.car_width)  # the widest the car gets on screen
        self.scale = float(min(u(0.78, 0.9) * self.width / diagonal,
                               0.82 * self.height / (self.roof * cos_e + diagonal * sin_e)))  # pixels a metre
        # The floor point under the car's middle; the car's middle half a roof higher lands mid-frame.
        self.centre = np.array([self.width * (0.5 + u(-0.02, 0.02)),
                                self.height * (0.5 + u(-0.03, 0.03)) + self.scale * self.roof / 2 * cos_e])
        horizon = self.centre[1] - self.scale * u(2.5, 4.5) * sin_e  # the wall stands a few metres behind
        self.horizon = float(np.clip(horizon, 0.12 * self.height, 0.7 * self.height))
        half_l, half_w = self.car_length * 0.53, self.car_width * 0.56  # the shadow reaches past the car
        self.footprint = np.array([[half_l, half_w, 0], [half_l, -half_w, 0], [-half_l, -half_w, 0],
                                   [-half_l, half_w, 0]], dtype=float)

    def render(self, view: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
        """View 1..16 as a uint8 (H, W, 3) photo and its uint8 {0, 1} (H, W) mask."""
        from PIL import ImageDraw

        angle = -np.pi / 2 + 2 * np.pi * (view - 1) / SYNTHETIC_VIEWS  # view 1 shows the front, as in Carvana
        cos_a, sin_a = np.cos(angle), np.sin(angle)
        turn = np.array([[cos_a, -sin_a, 0.0], [sin_a, cos_a, 0.0], [0.0, 0.0, 1.0]])  # car -> camera frame
        cos_e, sin_e = np.cos(self.elevation), np.sin(self.elevation)
        to_screen = np.array([[self.scale, 0.0, 0.0], [0.0, -self.scale * sin_e, -self.scale * cos_e]]) @ turn
        towards_camera = turn.T @ np.array([0.0, -cos_e, sin_e])  # in car coordinates, like the normals
        light = turn.T @ _LIGHT

        def project(points: np.ndarray) -> np.ndarray:
            return points @ to_screen.T + self.centre

        # (polygon in pixels, colour, part of the silhouette?) in drawing order
        polygons: list[tuple[np.ndarray, np.ndarray, bool]] = []
        for outer, inner, _ in sorted(self.wheels, key=lambda wheel: wheel[2] @ towards_camera):  # far first
            polygons.append((_convex_hull(project(np.vstack([outer, inner]))), np.array(_TYRE), True))
        near = 1 if towards_camera[1] > 0 else -1
        for part in (self.body, self.mirrors[-near], self.cabin, self.mirrors[near]):
            for face in part:
                if face.normal @ towards_camera <= 1e-9:
                    continue
                shade = _AMBIENT + _DIFFUSE * max(0.0, float(face.normal @ light))
                polygons.append((project(face.points), face.color * shade, True))
                polygons.extend((project(points), color * shade, False) for points, color in face.decals)

        # Draw at `supersample` times the resolution, only over the car's bounding box.
        outline = np.vstack([points for points, _, silhouette in polygons if silhouette])
        x0, y0 = np.maximum(np.floor(outline.min(axis=0)).astype(int) - 1, 0)
        x1, y1 = np.minimum(np.ceil(outline.max(axis=0)).astype(int) + 1, (self.width, self.height))
        box_w, box_h = x1 - x0, y1 - y0
        paint = Image.new("RGB", (box_w * supersample, box_h * supersample))
        cover = Image.new("L", paint.size)
        draw_paint, draw_cover = ImageDraw.Draw(paint), ImageDraw.Draw(cover)
        fine_pixels = supersample ** 2
        for points, color, silhouette in polygons:
            # -0.5: PIL's pixel k is centred on k, the fine pixel k covers [k, k+1) / supersample
            xy = ((points - (x0, y0)) * supersample - 0.5).ravel().tolist()
            draw_paint.polygon(xy, fill=tuple(min(255, max(0, round(c))) for c in color.tolist()))
            if silhouette:
                draw_cover.polygon(xy, fill=fine_pixels)  # so that averaging counts the covered ones
        # A decal can round a fine pixel past the edge of its face: keep the paint inside the silhouette.
        paint.paste((0, 0, 0), mask=cover.point([255] + [0] * 255))

        # The car's fine pixels are averaged into the photo (colour premultiplied by coverage, black
        # elsewhere) and counted into the mask, so that a pixel is car exactly when it is mostly car.
        counts = np.asarray(cover.reduce(supersample))
        coverage = counts.astype(np.float32) / fine_pixels
        photo = self._backdrop_with_shadow(project(self.footprint))
        region = photo[y0:y1, x0:x1]
        region *= 1 - coverage[:, :, None]
        region += np.asarray(paint.reduce(supersample), dtype=np.float32)
        mask = np.zeros((self.height, self.width), dtype=np.uint8)
        mask[y0:y1, x0:x1] = 2 * counts >= fine_pixels
        return np.clip(np.rint(photo), 0, 255).astype(np.uint8), mask

    def _backdrop_with_shadow(self, footprint: np.ndarray) -> np.ndarray:
        """The backdrop darkened by a soft shadow of the (k, 2) footprint polygon, float32 (H, W, 3)."""
        from PIL import ImageDraw, ImageFilter

        factor = 4  # a blurred shadow needs no detail: draw and blur it at a quarter of the resolution
        small = Image.new("L", (-(-self.width // factor), -(-self.height // factor)))
        ImageDraw.Draw(small).polygon((footprint / factor - 0.5).ravel().tolist(), fill=255)
        small = small.filter(ImageFilter.GaussianBlur(0.2 * self.scale / factor))  # 20 cm of penumbra
        shadow = small.resize((self.width, self.height), Image.BILINEAR,
                              box=(0, 0, self.width / factor, self.height / factor))
        darken = 1 - np.asarray(shadow, dtype=np.float32) * (self.shadow_strength / 255)
        return self.backdrop * darken[:, :, None]


def _save_mask(mask: np.ndarray, path: Path) -> None:
    """A {0, 1} mask as a palette GIF like Kaggle's: index 0 black (background), 1 white (car)."""
    image = Image.fromarray(mask)
    image.putpalette([0, 0, 0, 255, 255, 255])
    image.save(path, optimize=False)  # optimize renumbers the palette, e.g. an all-car mask to index 0


def _synthetic_params(cars: int, width: int, height: int, seed: int) -> dict:
    """What synthetic.json records: the arguments and generator version that determine every byte."""
    if cars < 1:
        raise ValueError(f"cars must be at least 1, got {cars}")
    if width < 32 or height < 32:
        raise ValueError(f"size must be at least 32x32, got {width}x{height}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return {"cars": cars, "width": width, "height": height, "seed": seed, "views": SYNTHETIC_VIEWS,
            "generator": "dataset.py synthetic", "version": SYNTHETIC_VERSION}


def _is_complete_synthetic(out: Path, params: dict) -> bool:
    """True if out holds a complete synthetic dataset made with params; False if it is absent or empty.

    Raises FileExistsError for anything else, so that no other data is overwritten or mistaken for it.
    """
    import json

    if not out.exists():
        return False
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another --out")
    manifest = out / SYNTHETIC_MANIFEST
    if not manifest.is_file():
        if any(out.iterdir()):
            raise FileExistsError(f"{out} already holds files but no {SYNTHETIC_MANIFEST}, so it is not a "
                                  f"synthetic dataset; choose another --out or empty it")
        return False
    try:
        found = json.loads(manifest.read_text())
    except ValueError:
        found = None
    if found != params:
        if isinstance(found, dict):
            keys = [key for key in params if found.get(key) != params[key]]
            made = ", ".join(f"{key}={found.get(key)}" for key in keys)
            detail = f"made with {made}, not {', '.join(f'{key}={params[key]}' for key in keys)}"
        else:
            detail = f"whose {SYNTHETIC_MANIFEST} is unreadable"
        raise FileExistsError(f"{out} holds a synthetic dataset {detail}; choose another --out or delete it "
                              f"to regenerate")
    masks = out / MASK_DIR
    n_masks = sum(1 for p in masks.iterdir() if not is_hidden(p)) if masks.is_dir() else 0
    n_images, n_pairs = len(list_images(out)), params["cars"] * params["views"]
    if n_images != n_pairs or n_masks != n_pairs:
        raise FileExistsError(f"{out} is incomplete: {n_images} photos and {n_masks} masks where "
                              f"{SYNTHETIC_MANIFEST} promises {n_pairs} of each; delete it to regenerate")
    return True


def generate_synthetic(out_dir: str | Path, cars: int = 24, size: tuple[int, int] = (480, 320),
                       seed: int = 0) -> Path:
    """Write a synthetic dataset in Kaggle's layout; size is (width, height). Returns out_dir.

    Each car gets 16 views as it turns on a studio backdrop, as JPEGs with exact palette-GIF masks.
    The same arguments give byte-identical files. The files are written into a temporary sibling folder
    renamed into place at the end, with synthetic.json recording the arguments; when out_dir already
    holds the same dataset it is returned as is, anything else in out_dir is refused.
    """
    import json
    import os
    import shutil
    import tempfile
    import time

    from tqdm import tqdm

    out = Path(out_dir)
    width, height = size
    params = _synthetic_params(cars, width, height, seed)
    pairs = cars * SYNTHETIC_VIEWS
    if _is_complete_synthetic(out, params):
        print(f"synthetic dataset already in {out} ({pairs} pairs, {width}x{height}, seed {seed})")
        return out

    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset is not
        (tmp / IMAGE_DIR).mkdir()
        (tmp / MASK_DIR).mkdir()
        supersample = 4 if width * height <= 1_000_000 else 2  # 2x keeps Kaggle's size to ~2 s a car
        car_ids: set[str] = set()
        # One independent stream per car: the first cars don't depend on how many are generated.
        for stream in tqdm(np.random.SeedSequence(seed).spawn(cars), desc="synthetic cars", unit="car"):
            rng = np.random.default_rng(stream)
            car = f"{int(rng.integers(1 << 48)):012x}"
            while car in car_ids:
                car = f"{int(rng.integers(1 << 48)):012x}"
            car_ids.add(car)
            scene = _SyntheticCar(rng, width, height)
            for view in range(1, SYNTHETIC_VIEWS + 1):
                photo, mask = scene.render(view, supersample)
                image_path = tmp / IMAGE_DIR / f"{car}_{view:02d}.jpg"
                Image.fromarray(photo).save(image_path, quality=90)
                _save_mask(mask, mask_path_for(image_path, tmp))
        (tmp / SYNTHETIC_MANIFEST).write_text(json.dumps(params, indent=2) + "\n")
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an empty folder (made by hand, say) is replaced
        try:
            tmp.rename(out)
        except OSError:
            if not _is_complete_synthetic(out, params):  # a run started alongside finished first
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {pairs} synthetic image/mask pairs ({cars} cars x {SYNTHETIC_VIEWS} views, "
          f"{width}x{height}, seed {seed}) to {out} in {time.perf_counter() - start:.1f} s")
    return out


def add_synthetic_args(parser: argparse.ArgumentParser) -> None:
    """Flags of `python dataset.py synthetic`."""
    parser.add_argument("--out", default="data/synthetic", help="folder to write (default: %(default)s)")
    parser.add_argument("--cars", type=int, default=24, help="number of cars, 16 views each (default: %(default)s)")
    parser.add_argument("--size", default="480x320", help="image size WxH (default: %(default)s; Kaggle's is 1918x1280)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")


def synthetic_main(args: argparse.Namespace) -> int:
    """Entry point of `python dataset.py synthetic`."""
    try:
        width, height = parse_size(args.size)
        _synthetic_params(args.cars, width, height, args.seed)  # bad arguments: a message, not a traceback
    except (argparse.ArgumentTypeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        generate_synthetic(args.out, cars=args.cars, size=(width, height), seed=args.seed)
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def parse_size(text: str) -> tuple[int, int]:
    """'480x320' -> (480, 320)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 480x320 (width x height), got {text!r}")
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return width, height


# ---------------------------------------------------------------------------------------------
# Kaggle download
# ---------------------------------------------------------------------------------------------

def add_download_args(parser: argparse.ArgumentParser) -> None:
    """Flags of `python dataset.py download`."""
    parser.add_argument("--out", default="data/carvana", help="folder to extract into (default: %(default)s)")
    parser.add_argument("--hq", action="store_true", help="download train_hq.zip instead of train.zip")
    parser.add_argument("--with-test", action="store_true", help="also download test.zip (8 GB)")


def download_main(args: argparse.Namespace) -> int:
    """Entry point of `python dataset.py download`."""
    raise NotImplementedError  # DOWNLOAD: filled in by the Kaggle-download work


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    add_synthetic_args(commands.add_parser(
        "synthetic", help="write a synthetic Carvana-format dataset",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    add_download_args(commands.add_parser("download", help="download Carvana from Kaggle"))
    args = parser.parse_args(argv)
    return {"synthetic": synthetic_main, "download": download_main}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
