"""A synthetic Carvana: procedurally drawn cars turning in a studio, 16 views each, with exact masks.

    python synthetic.py --out data/synthetic                       # Kaggle's layout (train/, train_masks/)
    python synthetic.py --out data/synthetic-3class --classes 3    # class masks, generic layout

The same arguments give byte-identical files, so the README's first command, the tests and the
benchmarks all train on the same data without a Kaggle account.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from dataset import GENERIC, KAGGLE, list_images, list_masks, mask_path_for
from utils import UserError, parallel_map, parse_size, plural, run_program, save_mask_png, usable_cpus

# A car is a few convex prisms (lower body, cabin, door mirrors) and four wheel cylinders, in car
# coordinates: x forward, y to the car's left, z up, in metres, origin on the floor under its middle.
# It turns on the spot in front of an orthographic camera looking down at a small angle, and is drawn
# with the painter's algorithm in a fixed order instead of a depth sort: with the camera above the
# floor, of two points on one line of sight the higher one is the nearer, so the wheels' parts below
# the body lie behind it, and the cabin and mirrors, all above the body, lie in front of it. Inside one
# convex prism, drawing only the faces turned towards the camera is enough.

SYNTHETIC_VIEWS = 16
SYNTHETIC_MANIFEST = "synthetic.json"
# The car's parts, as render(parts=True) labels its pixels, and the classes each --classes N groups them into.
_BODY, _WINDOW, _WHEEL = 1, 2, 3  # the body includes lights, grille, plate and mirrors; wheels their arches
SYNTHETIC_CLASSES = {2: ("background", "car"), 3: ("background", "body", "windows and wheels"),
                     4: ("background", "body", "windows", "wheels")}
_PART_CLASS = {2: (0, 1, 1, 1), 3: (0, 1, 2, 2), 4: (0, 1, 2, 3)}  # part label -> class, per --classes
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


@dataclasses.dataclass(slots=True)
class _Face:
    """A flat convex polygon of a car part, with the polygons painted on it (windows, lights, wheels)."""

    points: np.ndarray  # (k, 3), car coordinates
    normal: np.ndarray  # outward, unit length
    color: np.ndarray
    decals: list[tuple[np.ndarray, np.ndarray, int]] = dataclasses.field(default_factory=list)  # points, colour, part

    def paint(self, points: np.ndarray, color: Sequence[float], part: int = _BODY) -> None:
        """Add a polygon drawn over the face, in the face's shade."""
        self.decals.append((points, np.asarray(color, dtype=float), part))


def _prism(profile: Sequence[tuple[float, float]], y0: float, y1: float, color: np.ndarray) -> list[_Face]:
    """The faces of a convex counter-clockwise (x, z) profile extruded from y0 to y1 > y0: the caps at y1 and y0,
    then per edge i -> i+1 the rectangle (p_i, y0), (p_i, y1), (p_i+1, y1), (p_i+1, y0), as `_patch` expects."""
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


def _disc(x: float, z: float, radius: float, y: float, floor: float = -np.inf) -> np.ndarray:
    """A circle in the plane at y, as a polygon; its points below z=floor are raised to it."""
    angles = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)
    zs = np.maximum(z + radius * np.sin(angles), floor)
    return _at_y(np.column_stack([x + radius * np.cos(angles), zs]), y)


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
                cap.paint(_disc(x, radius, radius * 1.1, outer_y, floor=clearance), _WHEEL_WELL, _WHEEL)
                cap.paint(_disc(x, radius, radius, outer_y), _TYRE, _WHEEL)
                cap.paint(_disc(x, radius, radius * 0.62, outer_y), rim, _WHEEL)
                cap.paint(_disc(x, radius, radius * 0.16, outer_y), rim * 0.5, _WHEEL)
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
        cabin[3].paint(_patch(cabin[3], (0.06, 0.94), (0.06, 0.93)), _GLASS, _WINDOW)  # windscreen
        cabin[5].paint(_patch(cabin[5], (0.07, 0.93), (0.07, 0.9)), _GLASS, _WINDOW)   # rear window

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
                cap.paint(_at_y(window, y), _GLASS, _WINDOW)
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

    def render(self, view: int, supersample: int, parts: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """View 1..16 as a uint8 (H, W, 3) photo and its uint8 {0, 1} (H, W) mask; with parts=True the mask
        labels each car pixel with the part most of it shows (_BODY, _WINDOW, _WHEEL) instead of 1."""
        import cv2

        angle = -np.pi / 2 + 2 * np.pi * (view - 1) / SYNTHETIC_VIEWS  # view 1 shows the front, as in Carvana
        cos_a, sin_a = np.cos(angle), np.sin(angle)
        turn = np.array([[cos_a, -sin_a, 0.0], [sin_a, cos_a, 0.0], [0.0, 0.0, 1.0]])  # car -> camera frame
        cos_e, sin_e = np.cos(self.elevation), np.sin(self.elevation)
        to_screen = np.array([[self.scale, 0.0, 0.0], [0.0, -self.scale * sin_e, -self.scale * cos_e]]) @ turn
        towards_camera = turn.T @ np.array([0.0, -cos_e, sin_e])  # in car coordinates, like the normals
        light = turn.T @ _LIGHT

        def project(points: np.ndarray) -> np.ndarray:
            return points @ to_screen.T + self.centre

        # (polygon in pixels, colour, part of the silhouette?, part label) in drawing order
        polygons: list[tuple[np.ndarray, np.ndarray, bool, int]] = []
        for outer, inner, _ in sorted(self.wheels, key=lambda wheel: wheel[2] @ towards_camera):  # far first
            tyre = project(np.vstack([outer, inner]))
            # The hull's indices, not its points: cv2 computes in float32, the corners stay float64.
            hull = cv2.convexHull(tyre.astype(np.float32), returnPoints=False).ravel()
            polygons.append((tyre[hull], np.array(_TYRE), True, _WHEEL))
        near = 1 if towards_camera[1] > 0 else -1
        for part in (self.body, self.mirrors[-near], self.cabin, self.mirrors[near]):
            for face in part:
                if face.normal @ towards_camera <= 1e-9:
                    continue
                shade = _AMBIENT + _DIFFUSE * max(0.0, float(face.normal @ light))
                polygons.append((project(face.points), face.color * shade, True, _BODY))
                polygons.extend((project(points), color * shade, False, part) for points, color, part in face.decals)

        # Draw at `supersample` times the resolution, only over the car's bounding box.
        outline = np.vstack([points for points, _, silhouette, _ in polygons if silhouette])
        x0, y0 = np.maximum(np.floor(outline.min(axis=0)).astype(int) - 1, 0)
        x1, y1 = np.minimum(np.ceil(outline.max(axis=0)).astype(int) + 1, (self.width, self.height))
        paint = Image.new("RGB", ((x1 - x0) * supersample, (y1 - y0) * supersample))
        cover = Image.new("L", paint.size)
        draw_paint, draw_cover = ImageDraw.Draw(paint), ImageDraw.Draw(cover)
        labels = Image.new("L", paint.size) if parts else None
        draw_labels = ImageDraw.Draw(labels) if labels is not None else None
        fine_pixels = supersample ** 2
        for points, color, silhouette, part in polygons:
            # -0.5: PIL's pixel k is centred on k, the fine pixel k covers [k, k+1) / supersample
            xy = ((points - (x0, y0)) * supersample - 0.5).ravel().tolist()
            draw_paint.polygon(xy, fill=tuple(min(255, max(0, round(c))) for c in color.tolist()))
            if silhouette:
                draw_cover.polygon(xy, fill=fine_pixels)  # so that averaging counts the covered ones
            if draw_labels is not None:
                draw_labels.polygon(xy, fill=part)
        # A decal can round a fine pixel past the edge of its face: keep the paint inside the silhouette.
        outside = cover.point([255] + [0] * 255)
        paint.paste((0, 0, 0), mask=outside)

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
        if labels is not None:
            labels.paste(0, mask=outside)
            # Each pixel takes the part covering most of its fine pixels.
            blocks = np.asarray(labels).reshape(y1 - y0, supersample, x1 - x0, supersample)
            votes = np.stack([(blocks == part).sum(axis=(1, 3)) for part in (_BODY, _WINDOW, _WHEEL)])
            mask[y0:y1, x0:x1] *= (votes.argmax(axis=0) + _BODY).astype(np.uint8)
        return np.clip(np.rint(photo), 0, 255).astype(np.uint8), mask

    def _backdrop_with_shadow(self, footprint: np.ndarray) -> np.ndarray:
        """The backdrop darkened by a soft shadow of the (k, 2) footprint polygon, float32 (H, W, 3)."""
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


def _synthetic_params(cars: int, width: int, height: int, seed: int, classes: int | None = None) -> dict:
    """What synthetic.json records: the arguments and generator version that determine every byte."""
    if cars < 1:
        raise ValueError(f"cars must be at least 1, got {cars}")
    if width < 32 or height < 32:
        raise ValueError(f"size must be at least 32x32, got {height}x{width} (height x width)")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if classes is not None and classes not in SYNTHETIC_CLASSES:
        raise ValueError(f"classes must be one of {', '.join(map(str, SYNTHETIC_CLASSES))}, got {classes}")
    params = {"cars": cars, "width": width, "height": height, "seed": seed, "views": SYNTHETIC_VIEWS,
              "generator": "synthetic.py", "version": SYNTHETIC_VERSION}
    # Binary datasets record no classes, so that their manifests match those already written.
    return params if classes is None else {**params, "classes": classes}


def _is_complete_synthetic(out: Path, params: dict) -> bool:
    """True if out holds a complete synthetic dataset made with params, False if it is absent or empty;
    UserError for anything else, so that no other data is overwritten or mistaken for it."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    if not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another --out")
    manifest = out / SYNTHETIC_MANIFEST
    if not manifest.is_file():
        raise UserError(f"{out} already holds files but no {SYNTHETIC_MANIFEST}, so it is not a "
                        f"synthetic dataset; choose another --out or empty it")
    try:
        found = json.loads(manifest.read_text(encoding="utf-8"))
    except ValueError:
        found = None
    if found != params:
        def settings(d: dict) -> str:
            return " ".join(f"{key}={value}" for key, value in d.items())

        held = (f"made with {settings(found)}, not {settings(params)}" if isinstance(found, dict)
                else f"whose {SYNTHETIC_MANIFEST} is unreadable")
        raise UserError(f"{out} holds a synthetic dataset {held}; choose another --out or delete it to regenerate")
    layout = GENERIC if params.get("classes") else KAGGLE
    n_images, n_masks = len(list_images(out, layout)), len(list_masks(out, layout))
    n_pairs = params["cars"] * params["views"]
    if n_images != n_pairs or n_masks != n_pairs:
        raise UserError(f"{out} is incomplete: {n_images} photos and {n_masks} masks where "
                        f"{SYNTHETIC_MANIFEST} promises {n_pairs} of each; delete it to regenerate")
    return True


def _write_synthetic_car(stream: np.random.SeedSequence, out: Path, width: int, height: int, supersample: int,
                         classes: int | None) -> str:
    """Draw one car from its own stream, its id first, and write its 16 views into `out`; returns the id."""
    rng = np.random.default_rng(stream)
    car = f"{int(rng.integers(1 << 48)):012x}"
    scene = _SyntheticCar(rng, width, height)
    layout = KAGGLE if classes is None else GENERIC
    for view in range(1, SYNTHETIC_VIEWS + 1):
        photo, mask = scene.render(view, supersample, parts=classes is not None)
        image_path = out / layout.image_dir / f"{car}_{view:02d}.jpg"
        Image.fromarray(photo).save(image_path, quality=90)
        if classes is None:
            _save_mask(mask, mask_path_for(image_path, out))
        else:
            labels = np.asarray(_PART_CLASS[classes], dtype=np.uint8)[mask]
            save_mask_png(labels, out / layout.mask_dir / f"{image_path.stem}.png", classes)
    return car


def generate_synthetic(out_dir: str | Path, cars: int = 24, size: tuple[int, int] = (480, 320),
                       seed: int = 0, classes: int | None = None, workers: int = 1) -> Path:
    """Write a synthetic dataset of size (width, height) into out_dir, in Kaggle's layout or, with classes, the
    generic one; returns out_dir. The same arguments give the same bytes, whatever `workers`."""
    out = Path(out_dir)
    width, height = size
    params = _synthetic_params(cars, width, height, seed, classes)
    layout = KAGGLE if classes is None else GENERIC
    pairs = cars * SYNTHETIC_VIEWS
    if _is_complete_synthetic(out, params):
        print(f"synthetic dataset already in {out} ({pairs} pairs, {width}x{height}, seed {seed})")
        return out

    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset is not
        (tmp / layout.image_dir).mkdir()
        (tmp / layout.mask_dir).mkdir()
        supersample = 4 if width * height <= 1_000_000 else 2  # large images at 2x, to render faster
        write_car = functools.partial(_write_synthetic_car, out=tmp, width=width, height=height,
                                      supersample=supersample, classes=classes)
        # One independent stream per car: the first cars don't depend on how many are generated.
        streams = np.random.SeedSequence(seed).spawn(cars)
        ids = list(tqdm(parallel_map(write_car, streams, workers, chunk=1), total=cars,
                        desc="synthetic cars", unit="car"))
        if len(set(ids)) < cars:  # two cars' files would have overwritten each other
            raise UserError(f"seed {seed} gives two cars the same id; choose another --seed")
        (tmp / SYNTHETIC_MANIFEST).write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
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
    kind = ""
    if classes is not None:
        kind = ", classes " + ", ".join(f"{i} {name}" for i, name in enumerate(SYNTHETIC_CLASSES[classes]))
    print(f"wrote {pairs} synthetic image/mask pairs ({plural(cars, 'car')} x {SYNTHETIC_VIEWS} views, "
          f"{height}x{width}, seed {seed}{kind}) to {out} in {time.perf_counter() - start:.1f} s")
    return out


# --- command line -----------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """synthetic.py's command line; values generate_synthetic would refuse are argparse errors (exit status 2)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder to write (default: data/synthetic, or data/synthetic-Nclass)")
    parser.add_argument("--cars", type=int, default=24, help="number of cars, 16 views each (default: %(default)s)")
    parser.add_argument("--size", type=parse_size, default="320x480", metavar="HxW",
                        help="image height x width, as every size here (default: %(default)s; Kaggle's is 1280x1918)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=usable_cpus(), help="processes rendering (default: one a core)")
    parser.add_argument("--classes", type=int, default=None, choices=sorted(SYNTHETIC_CLASSES),
                        help="write a multi-class dataset in the generic layout (images/, masks/ of class indices): "
                             + "; ".join(f"{n}: {', '.join(names)}" for n, names in SYNTHETIC_CLASSES.items()))
    args = parser.parse_args(argv)
    try:
        _synthetic_params(args.cars, args.size[1], args.size[0], args.seed, args.classes)
    except ValueError as e:
        parser.error(str(e))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Write the dataset; exit status 1 when --out holds something else."""
    args = parse_args(argv)
    out = args.out or ("data/synthetic" if args.classes is None else f"data/synthetic-{args.classes}class")

    def run() -> None:  # generate_synthetic returns the folder, not an exit status
        generate_synthetic(out, cars=args.cars, size=args.size[::-1], seed=args.seed, classes=args.classes,
                           workers=args.workers)

    return run_program(run)


if __name__ == "__main__":
    sys.exit(main())
