"""The operator's dashboard: score a grid with a registered model.

Run it with ``xcryonet dashboard`` or ``streamlit run dashboards/app.py`` (127.0.0.1 by default,
see .streamlit/config.toml). UI only: every computation is a function of the xcryonet package.
Environment: ``MLFLOW_TRACKING_URI`` (else params.yaml's store), ``XCRYONET_GRIDS`` (the folder
of grids to choose from, default data/raw), ``XCRYONET_PARAMS`` (default params.yaml).
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from xcryonet.config import load_params
from xcryonet.errors import InputError

PARAMS_PATH = os.environ.get("XCRYONET_PARAMS", "params.yaml")
GRIDS_DIR = Path(os.environ.get("XCRYONET_GRIDS", "data/raw"))
SCORES = ["brightness", "squareness", "cracking", "contamination", "overall"]


@st.cache_resource(show_spinner=False)
def _params():
    return load_params(PARAMS_PATH if Path(PARAMS_PATH).exists() else None)


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
        files = st.file_uploader(
            "A stitched .mrc, a SerialEM .mrc with its .mdoc, or a .zip of an EPU atlas folder",
            accept_multiple_files=True,
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
            caption="The square, and its cracking and contamination attention maps",
        )
    d1, d2 = st.columns(2)
    d1.download_button(
        "Targets CSV",
        targets.to_csv(index=False),
        file_name=f"{scored.grid.grid_id}_targets.csv",
        mime="text/csv",
    )
    picked = shown.head(int(top_n))
    if picked.empty:
        d2.caption("No square passes the filters: no navigator file.")
        return
    with tempfile.TemporaryDirectory() as tmp:
        nav = Path(tmp) / "targets.nav"
        write_navigator(nav, picked, grid_id=scored.grid.grid_id)
        nav_bytes = nav.read_bytes()
    d2.download_button(
        f"SerialEM navigator (top {len(picked)} shown squares)",
        io.BytesIO(nav_bytes),
        file_name=f"{scored.grid.grid_id}_targets.nav",
    )


st.set_page_config(page_title="xcryonet", layout="wide")
st.sidebar.title("xcryonet")
page = st.sidebar.radio("Page", ["Score a grid"])
if page == "Score a grid":
    score_page()
