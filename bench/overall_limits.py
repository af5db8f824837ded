"""How much can cracking and contamination move the simulated operator's overall score?

    python bench/overall_limits.py [--truth data/truth]

Reads the simulator's ground truth of every complete square and prints, for the overall score
(``simulate.overall_score``: the weakest of ice, squareness, 4 - cracking and
4 - contamination, one less when both defects are 2 or more):
- how often each attribute is the weakest (ties count for each) and the only weakest;
- the overall MAE and the share of squares changed when cracking, contamination or both are
  taken as 0 (a scorer blind to them), or one higher on every square (a scorer off by one).

A model's lead on cracking or contamination can show on overall only through these squares; if
they are few, two models that differ on the attributes tie on overall.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import read_truth  # noqa: E402  (bench/ sibling)

from xcryonet.simulate import ice_score, overall_score, score_squares  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--truth", default=str(ROOT / "data" / "truth"))
    args = ap.parse_args(argv)
    truth = read_truth(args.truth)
    if truth is None:
        return 2
    truth = truth[truth["complete"].astype(bool)]
    s = score_squares(truth)
    att = {
        "ice": np.asarray(ice_score(truth["ice_thickness_nm"])),
        "squareness": s["squareness"].to_numpy(),
        "cracking": s["cracking"].to_numpy(),
        "contamination": s["contamination"].to_numpy(),
    }
    overall = s["overall"].to_numpy()
    level = {
        "ice": att["ice"],
        "squareness": att["squareness"],
        "cracking": 4 - att["cracking"],
        "contamination": 4 - att["contamination"],
    }
    weakest = np.minimum.reduce(list(level.values()))
    is_min = {k: v == weakest for k, v in level.items()}
    n_min = np.sum(list(is_min.values()), axis=0)
    print(f"{len(truth)} complete squares in {truth['grid_id'].nunique()} grids")
    print(f"{'attribute':<14} {'weakest':>8} {'only weakest':>13}")
    for k, m in is_min.items():
        print(f"{k:<14} {m.mean():8.3f} {(m & (n_min == 1)).mean():13.3f}")

    def changed(**kw: np.ndarray) -> tuple[float, float]:
        v = overall_score(**{**att, **kw})
        return float(np.abs(v - overall).mean()), float((v != overall).mean())

    zero = np.zeros_like(overall)
    cases = {
        "cracking taken as 0": changed(cracking=zero),
        "contamination taken as 0": changed(contamination=zero),
        "both taken as 0": changed(cracking=zero, contamination=zero),
        "cracking +1 everywhere": changed(cracking=np.clip(att["cracking"] + 1, 0, 4)),
        "contamination +1 everywhere": changed(
            contamination=np.clip(att["contamination"] + 1, 0, 4)
        ),
    }
    print(f"{'scorer':<28} {'overall MAE':>11} {'squares changed':>16}")
    for k, (mae, share) in cases.items():
        print(f"{k:<28} {mae:11.3f} {share:16.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
