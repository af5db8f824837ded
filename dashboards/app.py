"""The operator's dashboard: score a grid with a registered model.

Run it with ``xcryonet dashboard`` or ``streamlit run dashboards/app.py`` (127.0.0.1 by default,
see .streamlit/config.toml). UI only: every computation is a function of the xcryonet package.
Environment: ``MLFLOW_TRACKING_URI`` (else params.yaml's store), ``XCRYONET_GRIDS`` (the folder
of grids to choose from, default data/raw), ``XCRYONET_PARAMS`` (default params.yaml, used
when the working folder has one; a file named here must exist).
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from xcryonet.config import DEFAULT_PARAMS, load_params
from xcryonet.errors import InputError

# The Prefect flows (pipelines/) live beside the dashboard in the repository, not in the
# package; streamlit puts only this folder on the path.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.append(_REPO_ROOT)

PARAMS_PATH = os.environ.get("XCRYONET_PARAMS", DEFAULT_PARAMS)
GRIDS_DIR = Path(os.environ.get("XCRYONET_GRIDS", "data/raw"))
SQUARES_DIR = Path(os.environ.get("XCRYONET_SQUARES", "squares"))
LABELS_CSV = Path(os.environ.get("XCRYONET_LABELS", "data/labels.csv"))
REPO = Path(os.environ.get("XCRYONET_REPO", "."))
SCORES = ["brightness", "squareness", "cracking", "contamination", "overall"]


def _params():
    return _load_params(PARAMS_PATH)


@st.cache_resource(show_spinner=False)
def _load_params(path: str):
    """The params of ``path``, cached per path (so the cache follows ``XCRYONET_PARAMS``)."""
    return load_params(path)


@st.cache_resource(show_spinner=False)
def _model(ref: str, version_key: str):
    """The model behind a registry reference; ``version_key`` pins the resolved version."""
    from xcryonet.stages import load_scoring_model

    return load_scoring_model(ref, _params().mlflow)


@st.cache_resource(show_spinner=False, max_entries=4)
def _scored(atlas: str, ref: str, version_key: str, stamp: float):
    """An extracted and scored atlas, kept so that moving between squares is instant."""
    from xcryonet.stages import score_atlas

    return score_atlas(Path(atlas), _model(ref, version_key), _params().extract)


def _model_choices() -> tuple[list[str], dict[str, str], str]:
    """Registry references (aliases first, then versions) and the resolved version of each."""
    from xcryonet.tracking import registry_summary

    summary = registry_summary(_params().mlflow)
    name = summary["model"]
    refs, version_of = [], {}
    for alias in ("champion", "challenger"):
        for v in summary["versions"]:
            if alias in v["aliases"]:
                refs.append(f"models:/{name}@{alias}")
                version_of[refs[-1]] = v["version"]
    for v in reversed(summary["versions"]):
        ref = f"models:/{name}/{v['version']}"
        refs.append(ref)
        version_of[ref] = v["version"]
    return refs, version_of, summary["tracking_uri"]


def _grid_choices() -> list[Path]:
    if not GRIDS_DIR.is_dir():
        return []
    return sorted(p for p in GRIDS_DIR.iterdir() if not p.name.startswith("."))


def score_page() -> None:
    st.header("Score a grid")
    try:
        refs, version_of, uri = _model_choices()
    except InputError as err:
        st.error(f"No registered model yet ({err}). Run `make demo` first.")
        return
    ref = st.selectbox("Model", refs, index=0, help=f"registry at {uri}")
    source = st.radio(
        "Atlas", ["A grid under " + str(GRIDS_DIR), "Upload"], horizontal=True, key="source"
    )
    atlas: Path | None = None
    if source == "Upload":
        cap_mb = int(st.get_option("server.maxUploadSize"))
        files = st.file_uploader(
            "A stitched .mrc, a SerialEM .mrc with its .mdoc, or a .zip of an EPU atlas folder "
            f"(up to {cap_mb} MB each)",
            accept_multiple_files=True,
        )
        st.caption(
            f"A file over {cap_mb} MB is refused before it reaches the app: it is marked red "
            "(hover it for the reason). Larger atlases: raise server.maxUploadSize in "
            ".streamlit/config.toml, or choose a grid under the data folder."
        )
        if files:
            from xcryonet.uploads import unpack_upload

            dest = Path(tempfile.mkdtemp(prefix="xcryonet-upload-"))
            try:
                atlas = unpack_upload([(f.name, f.getvalue()) for f in files], dest)
            except InputError as err:
                st.error(str(err))
                return
    else:
        grids = _grid_choices()
        if not grids:
            st.warning(f"No grids in {GRIDS_DIR}: run `make demo`, or upload an atlas.")
            return
        atlas = st.selectbox("Grid", grids, format_func=lambda p: p.name)
    if atlas is None:
        return
    key = (str(atlas), ref)
    if st.button("Score", type="primary"):
        with st.status(f"Scoring {atlas.name} with {ref}", expanded=False) as status:
            try:
                status.update(label="Loading the model")
                _model(ref, version_of[ref])
                status.update(label=f"Finding, cropping and scoring the squares of {atlas.name}")
                _scored(str(atlas), ref, version_of[ref], atlas.stat().st_mtime)
            except InputError as err:
                status.update(label="Failed", state="error")
                st.error(str(err))
                return
            status.update(label=f"Scored {atlas.name}", state="complete")
        st.session_state["scored_key"] = key
    if st.session_state.get("scored_key") != key:
        st.info("Press **Score** to find and score every square of this grid.")
        return
    scored = _scored(str(atlas), ref, version_of[ref], atlas.stat().st_mtime)
    show_results(scored, atlas.name)


def show_results(scored, atlas_name: str) -> None:
    from xcryonet.explain import render_attention
    from xcryonet.io.nav import write_navigator
    from xcryonet.stages import overview_picture

    targets: pd.DataFrame = scored.targets
    ranked = targets.dropna(subset=["rank"])
    st.subheader(f"{scored.grid.grid_id}: {len(targets)} squares, {len(ranked)} ranked")
    c1, c2, c3, c4 = st.columns(4)
    top_n = c1.number_input("Top N", 1, max(1, len(ranked)), min(20, max(1, len(ranked))))
    min_overall = c2.slider("Overall at least", 0.0, 4.0, 0.0, 0.5)
    max_crack = c3.slider("Cracking at most", 0.0, 4.0, 4.0, 0.5)
    max_contam = c4.slider("Contamination at most", 0.0, 4.0, 4.0, 0.5)
    shown = ranked[
        (ranked["overall"] >= min_overall)
        & (ranked["cracking"] <= max_crack)
        & (ranked["contamination"] <= max_contam)
    ]
    left, right = st.columns([3, 2])
    with left:
        st.image(
            overview_picture(scored, int(top_n)),
            caption="Squares coloured by overall (red 0 to green 4); the top N numbered by rank",
        )
    with right:
        st.dataframe(
            shown.round(2),
            hide_index=True,
            column_order=["rank", "square_id", "x_um", "y_um", *SCORES],
            height=420,
        )
        st.caption(f"{len(shown)} of {len(ranked)} ranked squares pass the filters")
    ids = shown["square_id"].astype(int).tolist()
    if ids:
        sid = st.selectbox("Square", ids, format_func=lambda s: f"#{s}")
        row = int(np.flatnonzero(scored.grid.table["square_id"].to_numpy() == sid)[0])
        st.image(
            render_attention(
                scored.inputs[row], scored.maps[row], scored.scores[row], title=f"square #{sid}"
            ),
            caption=(
                "The square, and its cracking and contamination attention maps (mean over its 8"
                " flips and rotations): where the network's cracking and contamination channels"
                " respond. On simulated grids they do not mark the defects themselves (per-square"
                " AUC 0.38-0.54, docs/experiment.md), so trust the scores, not the maps."
            ),
        )
    # The navigator holds the selected squares: the top N that pass the filters, to which the
    # operator may add or from which they may remove any square.
    options = shown["square_id"].astype(int).tolist()
    chosen = st.multiselect(
        "Squares for the navigator",
        options,
        default=options[: int(top_n)],
        format_func=lambda s: f"#{s}",
        key=f"nav_pick_{scored.grid.grid_id}_{int(top_n)}_{len(shown)}",
    )
    d1, d2 = st.columns(2)
    d1.download_button(
        "Targets CSV",
        targets.to_csv(index=False),
        file_name=f"{scored.grid.grid_id}_targets.csv",
        mime="text/csv",
    )
    picked = shown[shown["square_id"].astype(int).isin(chosen)]
    if picked.empty:
        d2.caption("No square selected: no navigator file.")
        return
    with tempfile.TemporaryDirectory() as tmp:
        nav = Path(tmp) / "targets.nav"
        write_navigator(nav, picked, grid_id=scored.grid.grid_id)
        nav_bytes = nav.read_bytes()
    d2.download_button(
        f"SerialEM navigator ({len(picked)} selected squares)",
        io.BytesIO(nav_bytes),
        file_name=f"{scored.grid.grid_id}_targets.nav",
    )


@st.cache_data(show_spinner=False, max_entries=8)
def _grid_crops(grid_id: str, stamp: float) -> np.ndarray:
    from xcryonet.stages import load_crops

    return load_crops(SQUARES_DIR, grid_id)[0].astype(np.float32)


@st.cache_data(show_spinner=False, max_entries=8)
def _uncertainty(grid_id: str, ref: str, version_key: str, stamp: float) -> np.ndarray:
    from xcryonet.active import tta_uncertainty

    return tta_uncertainty(_model(ref, version_key), _grid_crops(grid_id, stamp))


def label_page() -> None:
    from xcryonet.labels import save_label
    from xcryonet.stages import label_table

    st.header("Label squares")
    if not SQUARES_DIR.is_dir():
        st.warning(f"No extracted squares in {SQUARES_DIR}: run `make demo` first.")
        return
    try:
        table = label_table(SQUARES_DIR, LABELS_CSV)
    except InputError as err:
        st.error(str(err))
        return
    counts = table.groupby("grid_id")["labelled"].agg(["sum", "size"])
    done, total = int(counts["sum"].sum()), int(counts["size"].sum())
    st.progress(done / max(total, 1), text=f"{done} of {total} squares labelled")
    with st.expander("Progress per grid"):
        st.dataframe(
            counts.rename(columns={"sum": "labelled", "size": "squares"}), use_container_width=True
        )
    grid_id = st.selectbox("Grid", sorted(counts.index), key="label_grid")
    mode = st.radio(
        "Order", ["Most uncertain first", "Random"], horizontal=True, key="label_order",
        help="Uncertainty: how much the model's scores change over flips and rotations of the "
        "square, which cannot change its true scores.",
    )  # fmt: skip
    rows = table[table["grid_id"] == grid_id].reset_index(drop=True)
    stamp = (SQUARES_DIR / grid_id / "crops.npz").stat().st_mtime
    crops = _grid_crops(grid_id, stamp)
    labelled = rows["labelled"].to_numpy(bool)
    from xcryonet.active import labelling_order

    model = None
    try:
        refs, version_of, _ = _model_choices()
        ref = refs[0]
        model = _model(ref, version_of[ref])
    except InputError:
        st.info("No registered model: squares come in random order and without predictions.")
    if model is not None and mode.startswith("Most"):
        order = labelling_order(_uncertainty(grid_id, ref, version_of[ref], stamp), labelled)
    else:
        order = labelling_order(np.zeros(len(rows)), labelled, mode="random", seed=0)
    pos_key = f"label_pos_{grid_id}_{mode}"
    pos = min(st.session_state.get(pos_key, 0), len(order) - 1)
    row = rows.iloc[int(order[pos])]
    sid = int(row["square_id"])
    crop = crops[sid]
    left, right = st.columns([2, 3])
    with left:
        st.image(np.clip(crop / 1.2, 0, 1), caption=f"{grid_id} #{sid}", width=320)
    with right:
        st.markdown(f"**Square {pos + 1} of {len(order)}** in this order "
                    f"({'labelled' if row['labelled'] else 'not labelled yet'})")  # fmt: skip
        guess: dict[str, float] = {}
        if model is not None:
            from xcryonet.train import predict

            guess = dict(zip(SCORES, predict(model, [crop])[0], strict=True))
            st.caption("Model: " + ", ".join(f"{k} {v:.1f}" for k, v in guess.items()))
        chosen = {}
        for name in ("cracking", "contamination", "overall"):
            current = row.get(f"label_{name}")
            if current is not None and current == current:
                default = int(current)
            else:
                default = int(round(guess.get(name, 0)))
            chosen[name] = st.radio(
                name, [0, 1, 2, 3, 4], index=default, horizontal=True, key=f"lab_{name}_{sid}"
            )
        st.caption("Keys: 0-4 set overall and save, Enter saves, Right skips, Left goes back.")
        quick = None
        for value, col in enumerate(st.columns(5)):
            if col.button(f"Overall {value}", key=f"quick_overall_{value}", shortcut=str(value)):
                quick = value
        b1, b2, b3 = st.columns(3)
        save = b1.button("Save label", type="primary", key="save_label", shortcut="Enter")
        if save or quick is not None:
            if quick is not None:
                chosen["overall"] = quick
            pitch = float(row["pitch_um"]) if "pitch_um" in row else 100.0
            try:
                action = save_label(
                    LABELS_CSV, grid_id, float(row["x_um"]), float(row["y_um"]),
                    {k: int(v) for k, v in chosen.items()}, match_um=0.3 * pitch,
                )  # fmt: skip
            except InputError as err:
                st.error(str(err))
            else:
                st.session_state[pos_key] = pos + 1
                st.session_state["last_saved"] = f"{action} {grid_id} #{sid} in {LABELS_CSV}"
                st.rerun()
        if b2.button("Skip", key="skip_label", shortcut="Right"):
            st.session_state[pos_key] = pos + 1
            st.rerun()
        if b3.button("Back", key="back_label", disabled=pos == 0, shortcut="Left"):
            st.session_state[pos_key] = pos - 1
            st.rerun()
        if st.session_state.get("last_saved"):
            st.success(st.session_state["last_saved"])
    st.divider()
    c1, c2 = st.columns(2)
    if c1.button("Commit labels to DVC", key="commit_labels"):
        from xcryonet.stages import commit_data

        try:
            result = commit_data(REPO)
        except InputError as err:
            st.error(str(err))
        else:
            st.success(
                f"data.dvc {'updated' if result['changed'] else 'unchanged'}: {result['md5']}"
            )
    if c2.button("Retrain now", key="retrain"):
        try:
            from pipelines.flows import trigger_retrain

            st.success(f"Retraining started: flow run {trigger_retrain()}")
        except Exception as err:  # the Prefect server or deployment is not there
            st.error(f"Could not start retraining ({type(err).__name__}: {err}). Start "
                     "`make prefect-server` and `make retrain-serve` first.")  # fmt: skip


MLFLOW_UI = os.environ.get("XCRYONET_MLFLOW_UI", "http://127.0.0.1:5000")


def compare_page() -> None:
    from xcryonet import tracking

    st.header("Compare runs")
    cfg = _params().mlflow
    runs = tracking.runs_table(cfg)
    st.markdown(f"Store: `{tracking.tracking_uri(cfg)}`. Details in the [MLflow UI]({MLFLOW_UI}) "
                "(`make mlflow-ui`).")  # fmt: skip
    if runs.empty:
        st.info("No training runs yet: run `make demo` or `xcryonet train`.")
    else:
        show = runs.drop(columns=["run_id"]).round({s: 3 for s in SCORES})
        st.dataframe(show, hide_index=True, use_container_width=True)
        labels = {r.run_id: f"{r.name} ({r.run_id[:8]})" for r in runs.itertuples()}
        picked = st.multiselect(
            "Runs to compare", list(labels), default=list(labels)[:2],
            format_func=lambda r: labels[r], key="compare_runs",
        )  # fmt: skip
        if len(picked) >= 1:
            sub = runs.set_index("run_id").loc[picked]
            bars = sub[SCORES].rename(index=labels).T
            st.subheader("Held-out MAE per score (lower is better)")
            st.bar_chart(bars, stack=False)
            curves = tracking.run_curves(cfg, picked)
            if not curves.empty:
                st.subheader("Learning curves")
                metric = st.selectbox("Metric", sorted(curves["metric"].unique()), key="curve")
                wide = (
                    curves[curves["metric"] == metric]
                    .pivot_table(index="epoch", columns="run_id", values="value")
                    .rename(columns=labels)
                )
                st.line_chart(wide)
            st.subheader("Predicted against true (held-out squares)")
            cols = st.columns(len(picked))
            with tempfile.TemporaryDirectory() as tmp:
                for col, run_id in zip(cols, picked, strict=True):
                    fig = tracking.run_figure(cfg, run_id, "pred_vs_true.png", Path(tmp) / run_id)
                    if fig is not None:
                        col.image(fig.read_bytes(), caption=labels[run_id])
                    else:
                        col.caption(f"{labels[run_id]}: no figure logged")
    st.subheader("Optuna studies")
    from xcryonet.tune import study_tables

    try:
        trials, importance = study_tables(_params().tune)
    except InputError as err:
        st.info(f"No study yet ({err}). Run `xcryonet tune`.")
        return
    st.dataframe(trials, hide_index=True, use_container_width=True)
    if "value" in trials and trials["value"].notna().any():
        st.line_chart(trials.set_index("number")["value"], x_label="trial", y_label="val MAE")
    if importance:
        st.bar_chart(pd.Series(importance, name="importance"), horizontal=True)


PAGES = {"Score a grid": score_page, "Compare runs": compare_page, "Label squares": label_page}

st.set_page_config(page_title="xcryonet", layout="wide")
st.sidebar.title("xcryonet")
page = st.sidebar.radio("Page", list(PAGES), key="page")
try:
    _params()
except InputError as err:  # e.g. a mistyped XCRYONET_PARAMS: say so, do not run on defaults
    st.error(f"{err} (XCRYONET_PARAMS)")
    st.stop()
PAGES[page]()
