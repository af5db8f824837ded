"""One dashboard session under streamlit.testing, in its own process (the tests start several at
once). The app reads its folders and stores from the XCRYONET_* and MLFLOW_TRACKING_URI
environment variables, as in production.

    python tests/dashboard_session.py label GRID N   # save N labels on GRID; prints {sid: scores}
    python tests/dashboard_session.py retrain        # press "Retrain now"; prints the messages
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "dashboards" / "app.py")


def store_uri(root: Path) -> str:
    """The tracking URI of the ``store`` fixture (tests/conftest.py)."""
    return f"sqlite:///{root / 'mlruns.db'}"


def app_env(store: Path, labels: Path) -> dict[str, str]:
    """The variables the app reads, pointed at the ``store`` fixture and at ``labels``."""
    return {
        "MLFLOW_TRACKING_URI": store_uri(store),
        "XCRYONET_GRIDS": str(store / "raw"),
        "XCRYONET_SQUARES": str(store / "squares"),
        "XCRYONET_LABELS": str(labels),
        "XCRYONET_PARAMS": str(store / "params.yaml"),
    }


def _label_page() -> AppTest:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=180).run()
    at.sidebar.radio(key="page").set_value("Label squares").run()
    assert not at.exception, at.exception
    return at


def label(grid_id: str, n: int) -> dict[int, dict[str, int]]:
    """Save ``n`` labels on ``grid_id`` in the page's random order, alternating the Save button
    and the overall quick buttons (keys 0-4); returns the last scores saved per square id."""
    at = _label_page()
    at.selectbox(key="label_grid").set_value(grid_id).run()
    at.radio(key="label_order").set_value("Random").run()
    saved: dict[int, dict[str, int]] = {}
    for k in range(n):
        caption = at.get("image")[0].proto.imgs[0].caption  # "<grid> #<sid>"
        assert caption.startswith(f"{grid_id} #"), caption
        sid = int(caption.split("#")[1])
        scores = {"cracking": k % 5, "contamination": (k // 5) % 5, "overall": (k + sid) % 5}
        at.radio(key=f"lab_cracking_{sid}").set_value(scores["cracking"])
        at.radio(key=f"lab_contamination_{sid}").set_value(scores["contamination"])
        if k % 2:
            at.button(key=f"quick_overall_{scores['overall']}").click().run()
        else:
            at.radio(key=f"lab_overall_{sid}").set_value(scores["overall"])
            at.button(key="save_label").click().run()
        assert not at.exception, at.exception
        assert not at.error, [e.value for e in at.error]
        saved[sid] = scores
    return saved


def retrain() -> dict[str, list[str]]:
    at = _label_page()
    at.button(key="retrain").click().run()
    assert not at.exception, at.exception
    return {"success": [m.value for m in at.success], "error": [m.value for m in at.error]}


if __name__ == "__main__":
    if sys.argv[1] == "label":
        print(json.dumps(label(sys.argv[2], int(sys.argv[3]))))
    else:
        print(json.dumps(retrain()))
