"""Demo labels from an operator whose overall score weighs the defects more.

    python bench/defect_weighted_labels.py --out out/labels_dw.csv [--truth data/truth]

The demo's simulated operator scores overall as min(ice, squareness, 5 - cracking,
5 - contamination), so a light defect costs nothing and overall is mostly the ice
(``bench/overall_limits.py``). This writes a labels.csv for the same squares, with the same
clicks, slips and blanks as ``data/labels.csv`` (the simulator's own ``operator_labels`` with
its seed; a click can differ by 0.01 µm, as the truth CSVs keep 3 decimals), where overall is
min(ice, squareness, 4 - cracking, 4 - contamination), minus one when
both defects are 2 or more. Cracking and contamination labels are unchanged. Feed it to
``xcryonet experiment --labels`` to test the paper's claims on overall where the defects count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import read_truth  # noqa: E402  (bench/ sibling)

from xcryonet.config import Params  # noqa: E402
from xcryonet.io.atomic import atomic_write_text  # noqa: E402
from xcryonet.simulate import _to_csv, ice_score, operator_labels, score_squares  # noqa: E402


def weighted_overall(ice: np.ndarray, sq: np.ndarray, cr: np.ndarray, co: np.ndarray) -> np.ndarray:
    """Overall 0..4 where any cracking or contamination costs at least one point."""
    best = np.minimum(np.minimum(ice, sq), np.minimum(4 - cr, 4 - co))
    return np.clip(best - ((cr >= 2) & (co >= 2)), 0, 4)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="labels.csv to write")
    ap.add_argument("--truth", default=str(ROOT / "data" / "truth"))
    args = ap.parse_args(argv)
    truth = read_truth(args.truth)
    if truth is None:
        return 2
    s = score_squares(truth)
    ice = np.asarray(ice_score(truth["ice_thickness_nm"]))
    cfg = Params().simulate
    weighted = truth.copy()
    weighted["overall"] = weighted_overall(
        ice, s["squareness"].to_numpy(), s["cracking"].to_numpy(), s["contamination"].to_numpy()
    )
    # The same random draw as the demo's labels.csv: only the overall values differ.
    labels = operator_labels(weighted, cfg.label_fraction, cfg.seed, click_um=cfg.label_click_um)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), _to_csv(labels, {"x_um": 2, "y_um": 2}))
    done = truth["complete"].astype(bool).to_numpy()
    changed = (weighted["overall"].to_numpy() != truth["overall"].to_numpy())[done].mean()
    print(f"{args.out}: {len(labels)} labelled squares; true overall changed on {changed:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
