"""Benchmark square extraction against the naive method.

    python bench/extract.py            # EPU-scale demo atlas and paper-scale atlas
    python bench/extract.py --quick    # EPU-scale demo atlas only

For each atlas it prints the wall time and peak RSS of the whole ``xcryonet extract`` of the
atlas files on disk (read, stitch, find, crop, auto-label, write; a fresh subprocess), and of
``find_squares`` alone; for the latter, wall time and peak RSS (``VmHWM``) are measured (run in a
fresh subprocess that loads the atlas into memory first, so the RSS is the whole process: atlas,
libraries and the extraction), recall and precision on the complete squares (see
``xcryonet.extract.match_squares``), the position errors, and, in the same run, the time of the
naive method: ``skimage.feature.match_template`` of a full-resolution square template over the
full-resolution atlas (also in a fresh subprocess, with scipy's FFT allowed 2 threads), and the
ratio of the two.

Atlases (simulated with ``xcryonet.simulate``, cached in ``bench/.cache``; the cache key
includes the simulator's source, so a changed simulator rebuilds them):

- EPU-scale demo atlas: demo grid01 (200 mesh, 0.5 µm/px), written as an EPU atlas folder and
  read back with ``xcryonet.io.read_atlas`` (stitched from its tiles, stage affine fitted from
  the tiles' reported stage positions).
- paper-scale atlas: ``paper_scale_spec()`` (200 mesh, 0.1 µm/px, about 14.3k x 14.3k px,
  squares 900 px), its noisy tiles blended at their true positions.

The allocator settings MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ (4 GiB) are set for every
process (the script re-executes itself with them when they are missing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import MALLOC_ENV, ensure_malloc_env, rss_gb  # noqa: E402  (bench/ sibling)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Atlases


# Bump when what prepare_* writes changes.
CACHE_VERSION = "2"


def _source_key(*parts: str) -> str:
    h = hashlib.sha1(CACHE_VERSION.encode())
    for name in ("xcryonet/simulate.py", "xcryonet/io/stitch.py"):
        h.update((ROOT / name).read_bytes())
    for p in parts:
        h.update(p.encode())
    return h.hexdigest()[:10]


def prepare_epu(cache: Path) -> Path:
    """EPU-scale demo atlas: grid01 of the demo plan, through the EPU layout and reader."""
    from xcryonet.config import SimulateConfig
    from xcryonet.simulate import dataset_plan

    spec, _layout, seed = dataset_plan(SimulateConfig())[0]
    key = _source_key(repr(spec), str(seed), (ROOT / "xcryonet/io/read.py").read_text())
    out = cache / f"epu_{spec.grid_id}_{key}"
    if (out / "meta.json").exists():
        return out
    from xcryonet.io import read_atlas
    from xcryonet.simulate import simulate_grid, write_grid

    print(f"building {out.name} (simulate, write EPU, read back) ...", flush=True)
    grid = simulate_grid(spec, seed)
    folder = write_grid(grid, cache / "epu_files", "epu")
    atlas = read_atlas(folder)
    assert atlas.image is not None
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "image.npy", np.asarray(atlas.image, np.float32))
    grid.truth.to_csv(out / "truth.csv", index=False)
    meta = {
        "name": f"EPU-scale demo atlas ({spec.grid_id}, {spec.mesh} mesh, EPU layout)",
        "files": str(folder),
        "frame": "reader",
        "pixel_size_um": atlas.pixel_size_um,
        "affine": atlas.affine.tolist(),
        "affine_source": atlas.affine_source,
        "pitch_um": spec.pitch_um,
        "hole_um": spec.hole_um,
        "rotation_deg": spec.rotation_deg,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


def prepare_paper(cache: Path) -> Path:
    """Paper-scale atlas: the simulator's paper-scale grid, noisy tiles blended in place."""
    from xcryonet.simulate import paper_scale_spec

    spec, seed = paper_scale_spec(), 1
    key = _source_key(repr(spec), str(seed))
    out = cache / f"paper_{key}"
    if (out / "meta.json").exists():
        return out
    from xcryonet.io.stitch import stitch_tiles
    from xcryonet.simulate import simulate_grid, write_grid

    print(f"building {out.name} (simulate about 14k x 14k px) ...", flush=True)
    grid = simulate_grid(spec, seed)
    folder = write_grid(grid, cache / "paper_files", "epu")
    image, _ = stitch_tiles(grid.tiles, grid.tile_origins_rc, refine=False, shape=grid.image.shape)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "image.npy", np.asarray(image, np.float32))
    grid.truth.to_csv(out / "truth.csv", index=False)
    meta = {
        "name": f"paper-scale atlas ({spec.mesh} mesh, {spec.hole_um / spec.pixel_size_um:.0f} px"
        " squares)",
        "files": str(folder),
        "frame": "truth",
        "pixel_size_um": spec.pixel_size_um,
        "affine": grid.affine.tolist(),
        "affine_source": "true affine of the simulation",
        "pitch_um": spec.pitch_um,
        "hole_um": spec.hole_um,
        "rotation_deg": spec.rotation_deg,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


# ---------------------------------------------------------------------------------------------
# Workers (fresh processes)


def worker_find(folder: Path, threads: int, repeat: int) -> dict:
    """Load the atlas, time ``find_squares`` (first call, and the median of ``repeat`` calls),
    save the squares; returns times and RSS."""
    from dataclasses import replace

    from xcryonet.config import ExtractConfig
    from xcryonet.extract import find_squares

    meta = json.loads((folder / "meta.json").read_text())
    image = np.load(folder / "image.npy")
    rss_loaded = rss_gb()
    cfg = replace(ExtractConfig(), threads=threads)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = find_squares(image, meta["pixel_size_um"], cfg)
        times.append(time.perf_counter() - t0)
    np.savez(
        folder / "found.npz",
        rc=np.array([(s.row_px, s.col_px) for s in res.squares], float).reshape(-1, 2),
        complete=np.array([s.complete for s in res.squares], bool),
        size=np.array([s.size_px for s in res.squares], float),
    )
    return {
        "seconds": times[0],
        "seconds_median": float(np.median(times)),
        "repeats": repeat,
        "rss_loaded_gb": rss_loaded,
        "peak_rss_gb": rss_gb(),
        "pitch_px": res.lattice.pitch_px,
        "square_px": res.lattice.square_px,
        "coarse_factor": res.coarse_factor,
        "n_found": len(res.squares),
    }


def worker_stage(folder: Path) -> dict:
    """Time the whole ``xcryonet extract`` of one grid from its files on disk.

    That is ``xcryonet.stages.extract_grid``: read and stitch the EPU tiles, fit the stage
    affine, find the squares, crop and auto-label each one, and write squares.csv, crops.npz,
    overview.png and atlas.json. Saves the squares' stage positions for scoring.
    """
    import shutil
    import tempfile

    import pandas as pd

    from xcryonet.config import ExtractConfig
    from xcryonet.stages import SQUARES_CSV, extract_grid

    meta = json.loads((folder / "meta.json").read_text())
    out = Path(tempfile.mkdtemp(prefix="xcryonet-bench-"))
    try:
        t0 = time.perf_counter()
        res = extract_grid(Path(meta["files"]), out, ExtractConfig())
        elapsed = time.perf_counter() - t0
        table = pd.read_csv(out / res["grid_id"] / SQUARES_CSV)
        written = sum(f.stat().st_size for f in (out / res["grid_id"]).iterdir())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    np.savez(
        folder / "found_stage.npz",
        xy=table[["x_um", "y_um"]].to_numpy(float).reshape(-1, 2),
        complete=table["complete"].to_numpy(bool),
    )
    return {
        "seconds": elapsed,
        "peak_rss_gb": rss_gb(),
        "n_found": len(table),
        "written_mb": written / 1e6,
    }


def score_stage(folder: Path) -> dict:
    """Recall, precision and stage error of the full extraction's squares.csv vs the truth."""
    import pandas as pd

    from xcryonet.extract import match_squares

    meta = json.loads((folder / "meta.json").read_text())
    truth = pd.read_csv(folder / "truth.csv")
    found = np.load(folder / "found_stage.npz")
    complete = truth["complete"].to_numpy(bool)
    m = match_squares(
        found["xy"],
        truth[["x_um", "y_um"]].to_numpy(),
        complete,
        0.3 * meta["pitch_um"],
        found["complete"],
    )
    return {
        "recall": m.recall,
        "precision": m.precision,
        "stage_err_max_um": float(m.error_px.max()) if len(m.error_px) else float("nan"),
    }


def worker_naive(folder: Path, crop: int) -> dict:
    """Time ``skimage.feature.match_template`` of a full-resolution template (scipy FFT, 2 threads).

    The template is one open square of the true side inside a full bar width of dark bars, at
    the true angle (the best a naive user could do); ``crop`` > 0 matches over a centred crop.
    """
    import scipy.fft
    from skimage.feature import match_template

    from xcryonet.extract import Levels, square_template

    meta = json.loads((folder / "meta.json").read_text())
    image = np.load(folder / "image.npy")
    if crop > 0:
        r0 = max(0, (image.shape[0] - crop) // 2)
        c0 = max(0, (image.shape[1] - crop) // 2)
        image = np.ascontiguousarray(image[r0 : r0 + crop, c0 : c0 + crop])
    p = meta["pitch_um"] / meta["pixel_size_um"]
    a = meta["hole_um"] / meta["pixel_size_um"]
    levels = Levels(bar=0.0, open=1.0, vacuum=1.0, threshold=0.5)
    template = square_template(p, a, math.radians(meta["rotation_deg"]), levels)
    rss_loaded = rss_gb()
    t0 = time.perf_counter()
    with scipy.fft.set_workers(2):
        ncc = match_template(image, template, pad_input=True)
    elapsed = time.perf_counter() - t0
    return {
        "seconds": elapsed,
        "shape": list(image.shape),
        "template": list(template.shape),
        "rss_loaded_gb": rss_loaded,
        "peak_rss_gb": rss_gb(),
        "ncc_max": float(ncc.max()),
    }


def _run_worker(args: list[str], timeout: float) -> dict:
    """Run this script as a worker in a fresh process; returns its JSON, or {"error": ...}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    env = {**os.environ, **MALLOC_ENV}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or [""]
        return {"error": f"exit {out.returncode}: {tail[0][:200]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Scoring and the report


def score(folder: Path) -> dict:
    """Recall, precision and errors of the found squares against the truth."""
    import pandas as pd

    from xcryonet.extract import match_squares

    meta = json.loads((folder / "meta.json").read_text())
    truth = pd.read_csv(folder / "truth.csv")
    found = np.load(folder / "found.npz")
    rc, flags = found["rc"], found["complete"]
    complete = truth["complete"].to_numpy(bool)
    affine = np.array(meta["affine"])
    found_xy = (affine @ np.column_stack([rc, np.ones(len(rc))]).T).T
    truth_xy = truth[["x_um", "y_um"]].to_numpy()
    m = match_squares(found_xy, truth_xy, complete, 0.3 * meta["pitch_um"], flags)
    # Pixel errors of the finder alone: remove the reader's frame offset (median shift).
    sel = m.truth_index >= 0
    d = rc[sel] - truth[["row_px", "col_px"]].to_numpy()[m.truth_index[sel]]
    d = d[complete[m.truth_index[sel]]]
    if meta["frame"] == "reader" and len(d):
        d = d - np.median(d, axis=0)
    px_err_um = np.linalg.norm(d, axis=1) * meta["pixel_size_um"] if len(d) else np.zeros(1)
    return {
        "n_truth_complete": int(complete.sum()),
        "recall": m.recall,
        "precision": m.precision,
        "fp": m.fp,
        "fn": m.fn,
        "stage_err_max_um": float(m.error_px.max()) if len(m.error_px) else float("nan"),
        "stage_err_mean_um": float(m.error_px.mean()) if len(m.error_px) else float("nan"),
        "px_err_max_um": float(px_err_um.max()),
        "complete_flag_agreement": m.complete_agreement,
    }


def bench_atlas(folder: Path, naive: str, timeout: float, threads: int, repeat: int) -> dict:
    meta = json.loads((folder / "meta.json").read_text())
    shape = np.load(folder / "image.npy", mmap_mode="r").shape
    print(f"\n== {meta['name']}: {shape[0]} x {shape[1]} px, {meta['pixel_size_um']} µm/px")
    fast = _run_worker(
        ["--worker", "find", str(folder), "--threads", str(threads), "--repeat", str(repeat)],
        timeout,
    )
    if "error" in fast:
        print(f"find_squares failed: {fast['error']}")
        return {"name": meta["name"], "error": fast["error"]}
    sc = score(folder)
    print(
        f"find_squares: {fast['seconds']:.2f} s (first call in a fresh process; median of "
        f"{fast['repeats']}: {fast['seconds_median']:.2f} s), "
        f"peak RSS {fast['peak_rss_gb']:.2f} GB (atlas loaded: {fast['rss_loaded_gb']:.2f} GB), "
        f"coarse factor {fast['coarse_factor']}, "
        f"pitch {fast['pitch_px']:.1f} px, square {fast['square_px']:.1f} px"
    )
    print(
        f"  {fast['n_found']} squares found; complete truth squares {sc['n_truth_complete']}: "
        f"recall {sc['recall']:.4f}, precision {sc['precision']:.4f} (FN {sc['fn']}, FP {sc['fp']})"
    )
    print(
        f"  stage error (via {meta['affine_source'][:60]}): max {sc['stage_err_max_um']:.2f} µm, "
        f"mean {sc['stage_err_mean_um']:.2f} µm; pixel error of the finder alone: "
        f"max {sc['px_err_max_um']:.2f} µm; complete flags agree on "
        f"{100 * sc['complete_flag_agreement']:.1f} % of complete squares"
    )
    full = _run_worker(["--worker", "stage", str(folder)], timeout)
    if "error" in full:
        print(f"full extraction failed: {full['error']}")
        return {"name": meta["name"], "error": full["error"]}
    fsc = score_stage(folder)
    print(
        f"full `xcryonet extract` of the files on disk (read + stitch + find + crop + label + "
        f"write): {full['seconds']:.2f} s, peak RSS {full['peak_rss_gb']:.2f} GB, "
        f"{full['n_found']} squares, {full['written_mb']:.0f} MB written; "
        f"recall {fsc['recall']:.4f}, precision {fsc['precision']:.4f}, "
        f"stage error max {fsc['stage_err_max_um']:.2f} µm"
    )
    out = {
        "name": meta["name"],
        "shape": list(shape),
        **fast,
        **sc,
        "full_seconds": full["seconds"],
        "full_peak_rss_gb": full["peak_rss_gb"],
        "full_recall": fsc["recall"],
        "full_precision": fsc["precision"],
        "full_stage_err_max_um": fsc["stage_err_max_um"],
    }
    if naive == "skip":
        return out
    nv = _run_worker(["--worker", "naive", str(folder), "--crop", "0"], timeout)
    what = "full atlas"
    if "error" in nv and naive == "full":
        print(f"naive on the full atlas failed ({nv['error']}); measuring it on a crop")
        side = min(shape) // 2
        nv = _run_worker(["--worker", "naive", str(folder), "--crop", str(side)], timeout)
        if "error" not in nv:
            # FFT cost grows as N log N with the padded area; scale the crop time by that.
            n_full = (shape[0] + 2 * nv["template"][0]) * (shape[1] + 2 * nv["template"][1])
            n_crop = (side + 2 * nv["template"][0]) ** 2
            scale = n_full * math.log(n_full) / (n_crop * math.log(n_crop))
            what = (
                f"{side} x {side} crop, {nv['seconds']:.1f} s, extrapolated x{scale:.2f} "
                "to the full atlas"
            )
            nv["seconds"] *= scale
    if "error" in nv:
        print(f"naive method failed: {nv['error']}")
        return {**out, "naive_error": nv["error"]}
    ratio = nv["seconds"] / fast["seconds"]
    ratio_full = nv["seconds"] / full["seconds"]
    print(
        f"naive match_template ({nv['template'][0]} px template, {what}): "
        f"{nv['seconds']:.1f} s, peak RSS {nv['peak_rss_gb']:.2f} GB -> "
        f"find_squares (first call) is {ratio:.1f}x faster; the whole extraction, files to "
        f"outputs, is {ratio_full:.1f}x faster than the naive matching alone"
    )
    return {
        **out,
        "naive_seconds": nv["seconds"],
        "naive_what": what,
        "ratio": ratio,
        "ratio_full": ratio_full,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="EPU-scale demo atlas only")
    ap.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache")
    ap.add_argument(
        "--naive",
        choices=("full", "skip"),
        default="full",
        help="time the naive method on the full atlas (falls back to a crop on failure)",
    )
    ap.add_argument("--timeout", type=float, default=1800.0, help="per worker process, s")
    ap.add_argument("--threads", type=int, default=2, help="refinement threads")
    ap.add_argument("--repeat", type=int, default=3, help="find_squares calls to time")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--worker", choices=("find", "naive", "stage"), help=argparse.SUPPRESS)
    ap.add_argument("folder", nargs="?", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--crop", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    ensure_malloc_env()
    if args.worker == "find":
        print(json.dumps(worker_find(args.folder, args.threads, args.repeat)))
        return 0
    if args.worker == "stage":
        print(json.dumps(worker_stage(args.folder)))
        return 0
    if args.worker == "naive":
        print(json.dumps(worker_naive(args.folder, args.crop)))
        return 0

    args.cache.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs; cache {args.cache}")
    folders = [prepare_epu(args.cache)]
    if not args.quick:
        folders.append(prepare_paper(args.cache))
    results = [bench_atlas(f, args.naive, args.timeout, args.threads, args.repeat) for f in folders]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print("\nsummary")
    head = ("atlas", "find s", "full s", "RSS GB", "recall", "prec.", "err µm", "naive s")
    print(f"{head[0]:<20} " + " ".join(f"{h:>7}" for h in head[1:]) + "   ratio (find/full)")
    for r in results:
        if "error" in r:
            print(f"{r['name'][:20]:<20} error: {r['error']}")
            continue
        print(
            f"{r['name'][:20]:<20} {r['seconds']:7.2f} {r['full_seconds']:7.2f} "
            f"{r['full_peak_rss_gb']:7.2f} {r['full_recall']:7.4f} {r['full_precision']:7.4f} "
            f"{r['full_stage_err_max_um']:7.2f} {r.get('naive_seconds', float('nan')):7.1f}"
            f"   {r.get('ratio', float('nan')):.1f} / {r.get('ratio_full', float('nan')):.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
