"""Is boosting's lead its features or its learner? Neural heads on boosting's own features.

    python bench/head_probe.py [--repeats 4] [--labeled 100 500] [--seeds 3]
        [--squares DIR] [--labels CSV]

Computes ``square_features`` (the 77 hand-crafted features of the ``features_gbm`` baseline) for
every labelled square, then on each of the experiment's seeded splits (``train.split_rows``,
repeats 0..R-1) fits, on the same training squares:

- ``boosting``: the ``features_gbm`` baseline itself;
- ``mlp``: the CNN classifiers' head (Linear, ReLU, Linear; 64 hidden units) trained with MSE on
  the standardised features (AdamW, lr 3e-3, 400 full-batch steps);
- ``mlp ordinal``: the same with four logits of P(score > k) per score and binary
  cross-entropy (``train.masked_ordinal``); the score is the sum of the probabilities;
- ``mlp ordinal, dropout 0.3``: plus dropout of the hidden units in training;

and prints the rounded test MAE of cracking, contamination and overall, mean over the repeats
(each MLP: the mean over ``--seeds`` initialisations). If an MLP on boosting's features is as
far behind boosting as the CNN is, the CNN's gap is the learner on top, not its features.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import (  # noqa: E402  (bench/ sibling)
    add_data_args,
    label_matrix,
    report_or_one_line_error,
)

from xcryonet.baselines import FeaturesGBM, mae, square_features  # noqa: E402
from xcryonet.experiment import raw_crops  # noqa: E402
from xcryonet.labels import SCORE_NAMES  # noqa: E402
from xcryonet.model import N_THRESHOLDS, ordinal_scores  # noqa: E402
from xcryonet.train import masked_mse, masked_ordinal, read_table, split_rows  # noqa: E402

SCORES = ("cracking", "contamination", "overall")
HEADS = {
    "mlp": {"ordinal": False, "dropout": 0.0},
    "mlp ordinal": {"ordinal": True, "dropout": 0.0},
    "mlp ordinal, dropout 0.3": {"ordinal": True, "dropout": 0.3},
}


def fit_mlp(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    seed: int,
    ordinal: bool,
    dropout: float,
    hidden: int = 64,
    steps: int = 400,
) -> np.ndarray:
    """Scores (N_test, 5) of a two-layer head fitted on standardised features (N, F) and scores
    (N, 5) (NaN = no label), full batch."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    a = torch.tensor((x_train - mu) / sd, dtype=torch.float32)
    t = torch.tensor((x_test - mu) / sd, dtype=torch.float32)
    y = torch.tensor(y_train, dtype=torch.float32)
    torch.manual_seed(seed)
    k = N_THRESHOLDS if ordinal else 1
    net = torch.nn.Sequential(
        torch.nn.Linear(a.shape[1], hidden),
        torch.nn.ReLU(),
        torch.nn.Dropout(dropout),
        torch.nn.Linear(hidden, len(SCORE_NAMES) * k),
    )
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-3)
    for _ in range(steps):
        net.train()
        opt.zero_grad()
        out = net(a)
        loss = masked_ordinal(out.view(len(a), -1, k), y) if ordinal else masked_mse(out, y)
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        out = net(t)
    return (ordinal_scores(out.view(len(t), -1, k)) if ordinal else out).numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--labeled", type=int, nargs="+", default=[100, 500])
    ap.add_argument("--seeds", type=int, default=3, help="initialisations per MLP and split")
    add_data_args(ap, ROOT)
    return report_or_one_line_error(Path(__file__).name, report, ap.parse_args(argv))


def report(args: argparse.Namespace) -> int:
    """Print the table for ``args``."""
    table = read_table(args.squares, args.labels)
    y = label_matrix(table)
    rows = np.flatnonzero(table["labelled"].to_numpy())
    crops, masks = raw_crops(Path(args.squares), table.iloc[rows])
    feats, _ = square_features(crops, masks)
    x = np.zeros((len(table), feats.shape[1]))
    x[rows] = feats
    print(f"{'labels':>6} {'learner':<26} " + " ".join(f"{s:>13}" for s in SCORES))
    for n in args.labeled:
        err: dict[str, list[np.ndarray]] = {"boosting": [], **{h: [] for h in HEADS}}
        for r in range(args.repeats):
            lab, _, test = split_rows(
                table, supervision="fs", labeled=n, unlabeled=0, test_fraction=0.15, seed=r
            )

            def rounded_mae(pred: np.ndarray, test: np.ndarray = test) -> np.ndarray:
                err = mae(y[test], np.rint(np.clip(pred, 0, 4)))
                return np.array([err[s] for s in SCORES])

            gbm = FeaturesGBM().fit_features(x[lab], y[lab])
            err["boosting"].append(rounded_mae(gbm.predict_features(x[test])))
            for name, head in HEADS.items():
                preds = [fit_mlp(x[lab], y[lab], x[test], s, **head) for s in range(args.seeds)]
                err[name].append(np.mean([rounded_mae(p) for p in preds], axis=0))
        for name, e in err.items():
            cells = " ".join(f"{v:13.3f}" for v in np.mean(e, axis=0))
            print(f"{n:>6} {name:<26} {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
