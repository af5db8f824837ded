"""Synthetic atlases for the reader/writer tests: a structured scene cut into overlapping tiles."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def make_scene(shape: tuple[int, int], seed: int, pitch: int = 90) -> np.ndarray:
    """A float32 (rows, cols) scene with atlas-like structure: a rotated bar lattice over smooth
    texture, values about 50..250."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    texture = ndi.gaussian_filter(rng.normal(size=shape), 3.0)
    texture /= texture.std()
    r, c = np.mgrid[0:rows, 0:cols].astype(np.float64)
    ang = np.deg2rad(7.0)
    u = (r * np.cos(ang) + c * np.sin(ang)) % pitch
    v = (-r * np.sin(ang) + c * np.cos(ang)) % pitch
    bars = (u < pitch * 0.25) | (v < pitch * 0.25)
    scene = np.where(bars, 60.0, 200.0) + 15.0 * texture
    return ndi.gaussian_filter(scene, 1.0).astype(np.float32)


def true_affine(pixel_size_um: float, angle_deg: float = 3.0) -> np.ndarray:
    """An EPU-like pixel -> stage affine: flipped x axis and a small rotation."""
    t = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    # [x, y] from [row, col]: x runs against the columns (flip), y along the rows.
    lin = pixel_size_um * rot @ np.array([[0.0, -1.0], [1.0, 0.0]])
    return np.column_stack([lin, [850.0, -1000.0]])


@dataclass
class TiledScene:
    scene: np.ndarray
    tiles: list[np.ndarray]
    origins: np.ndarray  # (N, 2) true top-left (row, col), px
    tile_shape: tuple[int, int]
    pixel_size_um: float
    affine: np.ndarray

    def stage(self, origins: np.ndarray | None = None) -> np.ndarray:
        """True stage (x, y) µm of the tile centres (index origin + (shape - 1) / 2)."""
        o = self.origins if origins is None else origins
        centres = o + (np.array(self.tile_shape, float) - 1) / 2
        return (self.affine @ np.column_stack([centres, np.ones(len(o))]).T).T


def make_tiled(
    seed: int = 0,
    grid: tuple[int, int] = (3, 4),
    tile_shape: tuple[int, int] = (160, 200),
    step: tuple[int, int] = (136, 172),
    pixel_size_um: float = 1.5,
    noise: bool = False,
    dtype: type = np.float32,
) -> TiledScene:
    """Cut a scene into a grid of overlapping tiles (optionally with Poisson noise)."""
    rng = np.random.default_rng(seed + 1000)
    shape = (
        step[0] * (grid[0] - 1) + tile_shape[0],
        step[1] * (grid[1] - 1) + tile_shape[1],
    )
    scene = make_scene(shape, seed)
    tiles, origins = [], []
    for i in range(grid[0]):
        for j in range(grid[1]):
            r, c = i * step[0], j * step[1]
            t = scene[r : r + tile_shape[0], c : c + tile_shape[1]]
            if noise:
                t = rng.poisson(np.clip(t, 0, None)).astype(np.float32)
            tiles.append(np.asarray(t, dtype=dtype) if dtype != np.float32 else t.copy())
            origins.append((r, c))
    return TiledScene(
        scene,
        tiles,
        np.array(origins, float),
        tile_shape,
        pixel_size_um,
        true_affine(pixel_size_um),
    )


class Synth:
    """The helpers above, handed to tests as the ``synth`` fixture."""

    make_scene = staticmethod(make_scene)
    make_tiled = staticmethod(make_tiled)
    true_affine = staticmethod(true_affine)


@pytest.fixture
def synth() -> type[Synth]:
    return Synth


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
