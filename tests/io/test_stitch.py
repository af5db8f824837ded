"""stitch_tiles: placement, feathered blending, overlap registration and the global solve."""

from __future__ import annotations

import numpy as np
import pytest

from xcryonet.io.stitch import register_translation, solve_offsets, stitch_tiles, tent_weight


def test_exact_placement_reproduces_the_scene(synth) -> None:
    ts = synth.make_tiled()
    image, placed = stitch_tiles(ts.tiles, ts.origins, refine=False)
    assert image.dtype == np.float32 and image.shape == ts.scene.shape
    np.testing.assert_allclose(image, ts.scene, atol=1e-3)
    np.testing.assert_array_equal(placed, ts.origins)


def test_refinement_keeps_correct_placement(synth) -> None:
    ts = synth.make_tiled(noise=True)
    _, placed = stitch_tiles(ts.tiles, ts.origins)
    np.testing.assert_array_equal(placed, ts.origins)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refinement_corrects_placement_errors(synth, seed: int) -> None:
    ts = synth.make_tiled(seed=seed, grid=(4, 4), noise=True)
    err = np.random.default_rng(seed).integers(-3, 4, ts.origins.shape)
    _, placed = stitch_tiles(ts.tiles, ts.origins + err, max_shift_px=8)
    shift = placed - ts.origins
    assert np.ptp(shift, axis=0).max() == 0  # all tiles agree: seams are gone
    assert np.abs(shift[0]).max() <= 3  # and the mosaic stays near the metadata


def test_refinement_with_vignetting(synth) -> None:
    ts = synth.make_tiled(grid=(3, 4))
    h, w = ts.tile_shape
    r, c = np.mgrid[0:h, 0:w]
    vignette = 1 - 0.35 * (((r - h / 2) / h) ** 2 + ((c - w / 2) / w) ** 2) * 4
    tiles = [t * vignette.astype(np.float32) for t in ts.tiles]
    err = np.array(
        [
            [0, 0],
            [2, -2],
            [-2, 1],
            [1, 2],
            [-1, -2],
            [2, 0],
            [0, 2],
            [-2, -1],
            [1, -1],
            [0, 1],
            [2, 2],
            [-1, 0],
        ]
    )
    _, placed = stitch_tiles(tiles, ts.origins + err, max_shift_px=6)
    assert np.ptp(placed - ts.origins, axis=0).max() == 0


def test_featureless_tiles_keep_metadata_placement() -> None:
    rng = np.random.default_rng(0)
    # Pure noise: nothing to register, so every pair is rejected and the metadata stands.
    tiles = [rng.normal(100, 5, (80, 100)).astype(np.float32) for _ in range(4)]
    origins = np.array([[0, 0], [0, 85], [65, 0], [65, 85]], float) + [
        [0, 0],
        [1, 2],
        [-1, 1],
        [2, -2],
    ]
    _, placed = stitch_tiles(tiles, origins)
    np.testing.assert_array_equal(placed, np.rint(origins))


def test_shift_beyond_limit_is_not_accepted(synth) -> None:
    ts = synth.make_tiled(grid=(1, 2))
    origins = ts.origins + [[0, 0], [0, 6]]
    _, placed = stitch_tiles(ts.tiles, origins, max_shift_px=3)
    np.testing.assert_array_equal(placed, origins)  # a 6 px error is outside the 3 px window
    _, placed = stitch_tiles(ts.tiles, origins, max_shift_px=8)
    assert np.ptp(placed - ts.origins, axis=0).max() == 0


def test_register_translation_sign_convention(synth) -> None:
    scene = synth.make_scene((200, 200), 5)
    ref = scene[50:110, 40:160]
    mov = scene[53:113, 38:158]  # mov[p] = ref[p + (3, -2)], so mov must move by (3, -2)
    shift, corr = register_translation(ref, mov, 8)
    assert shift is not None
    np.testing.assert_allclose(shift, [3, -2], atol=0.25)
    assert corr > 0.9


def test_solve_offsets_drops_outliers() -> None:
    meas = [
        (0, 1, np.array([1.0, 0.0]), 1.0),
        (1, 2, np.array([1.0, 0.0]), 1.0),
        (0, 2, np.array([2.0, 0.0]), 1.0),
        (2, 3, np.array([0.0, 1.0]), 1.0),
        (1, 3, np.array([1.0, 1.0]), 1.0),
        (0, 3, np.array([9.0, -7.0]), 0.9),  # a false match
    ]
    delta = solve_offsets(4, meas)
    rel = delta - delta[0]
    np.testing.assert_allclose(rel, [[0, 0], [1, 0], [2, 0], [2, 1]], atol=1e-2)


def test_memmapped_integer_tiles(tmp_path, synth) -> None:
    from xcryonet.io import read_mrc, write_mrc

    ts = synth.make_tiled(dtype=np.int16)
    path = write_mrc(tmp_path / "stack.mrc", np.stack(ts.tiles), 1.0)
    stack, _ = read_mrc(path)
    image, _ = stitch_tiles([stack[k] for k in range(len(stack))], ts.origins)
    np.testing.assert_allclose(image, np.rint(ts.scene), atol=1.0)


def test_tent_weight() -> None:
    np.testing.assert_array_equal(tent_weight(5), [1, 2, 3, 2, 1])
    np.testing.assert_array_equal(tent_weight(4), [1, 2, 2, 1])
