"""Which hand-crafted features make gradient boosting beat the CNN on cracking and contamination?

    python bench/gbm_ablation.py [--repeats 4] [--labeled 100 900] [--squares DIR] [--labels CSV]

Computes ``square_features`` once for every labelled square, then, for each repeat (the
experiment's seeded splits) and label count, fits the ``features_gbm`` baseline on every
feature, and again with one family of features left out, and prints the rounded-prediction MAE
on cracking, contamination and overall on the same test squares (mean over the repeats).

The families: ``detectors`` are the threshold and morphology detectors of bright lines and
dark blobs (bright / dark pixel shares, top-hat, ridges, blobs, holes of the open area);
``texture`` the edge, local-s.d. and co-occurrence statistics; ``intensity`` the open-area
quantiles and means; ``geometry`` the shape of the open area. If leaving out ``detectors``
brings boosting down to the CNN's level, the simulated defects are found by a fixed threshold
on a clean intensity offset: the features are built for this simulator's defects.
``intensity + geometry`` is what is left without any local image feature.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import add_data_args, labelled_crops, report_or_one_line_error  # noqa: E402  (bench/ sibling)

from xcryonet.baselines import FeaturesGBM, square_features  # noqa: E402
from xcryonet.labels import SCORE_NAMES  # noqa: E402
from xcryonet.train import split_rows  # noqa: E402

FAMILIES = {
    "detectors": (
        "bright_",
        "vacuum_",
        "dark_foot_",
        "closed_in_foot",
        "holes_frac",
        "tophat",
        "blackhat",
        "ridge_",
        "valley_",
        "dark_blob",
        "bright_blob",
    ),
    "texture": ("grad_", "edge_", "lstd_", "glcm_"),
    "intensity": ("native_mean", "native_std", "int_", "core_"),
    "geometry": (
        "native_open_frac",
        "native_px",
        "open_frac",
        "filled_frac",
        "open_frac_norm",
        "lattice_coherence",
        "fill_",
        "side_norm",
        "aspect",
        "open_parts",
        "largest_part_frac",
    ),
}
SCORES = ("cracking", "contamination", "overall")


def family_of(name: str) -> str:
    """The family of feature ``name`` (each feature is in exactly one)."""
    hits = [f for f, prefixes in FAMILIES.items() if name.startswith(prefixes)]
    if len(hits) != 1:
        raise ValueError(f"feature {name} is in {len(hits)} families: {hits}")
    return hits[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--labeled", type=int, nargs="+", default=[100, 900])
    add_data_args(ap, ROOT)
    args = ap.parse_args(argv)
    return report_or_one_line_error(Path(__file__).name, report, args)


def report(args: argparse.Namespace) -> int:
    """Print the table for ``args``."""
    table, y, crops, masks = labelled_crops(args.squares, args.labels)
    x, names = square_features(crops, masks)
    family = np.array([family_of(n) for n in names])
    sets = {"all": np.ones(len(names), bool)}
    sets |= {f"without {f}": family != f for f in FAMILIES}
    sets["detectors only"] = family == "detectors"
    sets["intensity + geometry"] = np.isin(family, ["intensity", "geometry"])
    cols = [SCORE_NAMES.index(s) for s in SCORES]
    print(
        f"{len(names)} features: " + ", ".join(f"{f} {int((family == f).sum())}" for f in FAMILIES)
    )
    print(f"{'labels':>6} {'features':<20} " + " ".join(f"{s[:13]:>13}" for s in SCORES))
    for n in args.labeled:
        err = {k: [] for k in sets}
        for r in range(args.repeats):
            lab, _, test = split_rows(
                table, supervision="fs", labeled=n, unlabeled=0, test_fraction=0.15, seed=r
            )
            for key, keep in sets.items():
                model = FeaturesGBM().fit_features(x[lab][:, keep], y[lab])
                pred = model.predict_features(x[test][:, keep])
                err[key].append(np.nanmean(np.abs(pred - y[test]), axis=0)[cols])
        for key, e in err.items():
            m, s = np.mean(e, 0), np.std(e, 0, ddof=1) if len(e) > 1 else np.zeros(len(cols))
            cells = " ".join(f"{a:6.3f}±{b:5.3f}" for a, b in zip(m, s, strict=True))
            print(f"{n:>6} {key:<20} {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
