import numpy as np
import pytest

from xcryonet.baselines import (
    BASELINE_NAMES,
    FeatureConfig,
    FeaturesGBM,
    GBMConfig,
    IceFilter,
    area_matrix,
    build_baseline,
    mae,
    open_area_mean,
    resample_stack,
    square_features,
)
from xcryonet.labels import SCORE_NAMES

OVERALL = SCORE_NAMES.index("overall")


def _line(img, rng, value=1.0):
    """Draw a straight bright line (a crack) across img at a random angle, 1-2 px wide."""
    s = img.shape[0]
    rr, cc = np.mgrid[0:s, 0:s]
    a = rng.uniform(0, np.pi)
    r0, c0 = rng.uniform(0.35 * s, 0.65 * s, 2)
    dist = np.abs((rr - r0) * np.cos(a) - (cc - c0) * np.sin(a))
    img[dist < rng.uniform(0.6, 1.0)] = value


def _squares(n, seed):
    """Synthetic squares whose scores depend on brightness, cracks and dark blobs.

    Returns crops, masks, y (n, 5) and the number of cracks per square.
    """
    rng = np.random.default_rng(seed)
    crops, masks, y, n_cracks = [], [], [], []
    for _ in range(n):
        s = int(rng.choice([40, 56]))
        lo, hi = int(0.2 * s), int(0.8 * s)
        crop = np.zeros((s, s), np.float32)
        level = rng.uniform(0.3, 0.95)
        crop[lo:hi, lo:hi] = level
        open_ = np.zeros((s, s), bool)
        open_[lo:hi, lo:hi] = True
        cracks = int(rng.integers(0, 4))
        for _ in range(cracks):
            _line(crop, rng)
        crop[~open_] = 0.0
        blobs = int(rng.integers(0, 5))
        rr, cc = np.mgrid[0:s, 0:s]
        for _ in range(blobs):
            r0, c0 = rng.uniform(lo + 3, hi - 3, 2)
            crop[(rr - r0) ** 2 + (cc - c0) ** 2 < rng.uniform(2, 6) ** 2] = 0.02
        crop += rng.normal(0, 0.01, crop.shape).astype(np.float32)
        mask = crop > 0.15
        brightness = min(4, int(5 * level))
        cracking = cracks
        contamination = blobs
        overall = max(0, min(brightness, 4 - cracking, 4 - contamination))
        crops.append(crop)
        masks.append(mask)
        y.append([brightness, 4, cracking, contamination, overall])
        n_cracks.append(cracks)
    return crops, masks, np.array(y, float), np.array(n_cracks)


@pytest.fixture(scope="module")
def data():
    return _squares(160, seed=0)


def _fast_gbm():
    return FeaturesGBM(GBMConfig(features=FeatureConfig(size=48), max_iter=60))


def _build(name):
    """The registered baseline, with a quicker gradient boosting for the tests."""
    return _fast_gbm() if name == "features_gbm" else build_baseline(name)


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_fit_predict_shapes_and_range(name, data):
    crops, masks, y, _ = data
    model = build_baseline(name).fit(crops[:100], masks[:100], y[:100])
    pred = model.predict(crops[100:], masks[100:])
    assert pred.shape == (60, len(SCORE_NAMES))
    assert pred.dtype.kind == "f"
    assert np.isfinite(pred).all()
    assert pred.min() >= 0.0 and pred.max() <= 4.0


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_unlabelled_entries_are_ignored(name, data):
    crops, masks, y, _ = data
    crops, masks, y = crops[:90], masks[:90], y[:90]
    # Rows with no label at all: fitting with them equals fitting without them.
    rows = np.arange(90) % 3 != 0
    y_nan = y.copy()
    y_nan[~rows] = np.nan
    a = _build(name).fit(crops, masks, y_nan).predict(crops, masks)
    keep = np.flatnonzero(rows)
    b = _build(name).fit([crops[i] for i in keep], [masks[i] for i in keep], y[keep])
    np.testing.assert_allclose(a, b.predict(crops, masks))
    # One score unlabelled on some rows: that score is fit on its labelled rows only.
    y_part = y.copy()
    y_part[~rows, OVERALL] = np.nan
    a = _build(name).fit(crops, masks, y_part).predict(crops, masks)
    np.testing.assert_allclose(a[:, OVERALL], b.predict(crops, masks)[:, OVERALL])


def test_mean_predicts_training_means(data):
    crops, masks, y, _ = data
    y = y.copy()
    y[:10, 2] = np.nan
    pred = build_baseline("mean").fit(crops, masks, y).predict(crops[:3], masks[:3])
    np.testing.assert_allclose(pred, np.tile(np.nanmean(y, 0), (3, 1)))


def test_features_gbm_beats_mean(data):
    crops, masks, y, _ = data
    test = _squares(80, seed=1)
    gbm = _fast_gbm().fit(crops, masks, y).predict(test[0], test[1])
    mean = build_baseline("mean").fit(crops, masks, y).predict(test[0], test[1])
    err_gbm, err_mean = mae(test[2], gbm), mae(test[2], mean)
    for name in ("brightness", "cracking", "contamination", "overall"):
        assert err_gbm[name] < 0.7 * err_mean[name], (name, err_gbm[name], err_mean[name])


def test_features_gbm_is_deterministic_and_batch_independent(data):
    crops, masks, y, _ = data
    a = _fast_gbm().fit(crops[:80], masks[:80], y[:80])
    b = _fast_gbm().fit(crops[:80], masks[:80], y[:80])
    pa = a.predict(crops[80:], masks[80:])
    np.testing.assert_array_equal(pa, b.predict(crops[80:], masks[80:]))
    # A square's prediction does not depend on the other squares in the batch or their order.
    order = np.arange(80, 160)[::-1]
    pr = a.predict([crops[i] for i in order], [masks[i] for i in order])
    np.testing.assert_array_equal(pr[::-1], pa)
    np.testing.assert_array_equal(a.predict(crops[85:86], masks[85:86]), pa[5:6])


def test_ice_filter_uses_open_area_intensity_only(data):
    crops, masks, y, _ = data
    model = IceFilter().fit(crops[:100], masks[:100], y[:100])
    # Scramble each open area's pixels: cracks and blobs move or vanish, the mean stays.
    rng = np.random.default_rng(2)
    scrambled = []
    for c, m in zip(crops[100:], masks[100:], strict=True):
        c = c.copy()
        c[m] = rng.permutation(c[m])
        scrambled.append(c)
    a = model.predict(crops[100:], masks[100:])
    b = model.predict(scrambled, masks[100:])
    np.testing.assert_array_equal(a, b)
    # Only overall varies; the attributes are the training means.
    means = np.nanmean(y[:100], 0)
    others = [k for k in range(len(SCORE_NAMES)) if k != OVERALL]
    np.testing.assert_allclose(a[:, others], np.tile(means[others], (60, 1)))
    # Brighter ice (higher overall in this data) moves the prediction; a band was found.
    lo, hi = model.thresholds_
    assert lo < hi
    assert len(np.unique(a[:, OVERALL])) > 1


def test_ice_filter_fits_a_band():
    rng = np.random.default_rng(3)
    intensity = rng.uniform(0, 1, 300)
    overall = np.where((intensity > 0.4) & (intensity < 0.7), 4.0, 1.0)
    model = IceFilter().fit_intensity(intensity, overall)
    lo, hi = model.thresholds_
    assert abs(lo - 0.4) < 0.05 and abs(hi - 0.7) < 0.05
    assert model.levels_ == (1.0, 4.0, 1.0)


def test_mae_skips_unlabelled():
    y_true = np.array([[1, 2, np.nan, 0, 4], [3, np.nan, np.nan, 0, 2]], float)
    y_pred = np.array([[2, 2, 1, 1, 4], [3, 0, 1, 0, 0]], float)
    err = mae(y_true, y_pred)
    assert list(err) == list(SCORE_NAMES)
    assert err["brightness"] == 0.5
    assert err["squareness"] == 0.0
    assert np.isnan(err["cracking"])
    assert err["contamination"] == 0.5
    assert err["overall"] == 1.0


def test_bad_input_is_rejected(data):
    crops, masks, y, _ = data
    with pytest.raises(ValueError, match="unknown baseline 'cnn'"):
        build_baseline("cnn")
    with pytest.raises(ValueError, match="3 crops but 2 masks"):
        build_baseline("mean").fit(crops[:3], masks[:2], y[:3])
    with pytest.raises(ValueError, match=r"y has shape \(2, 5\), expected \(3, 5\)"):
        build_baseline("mean").fit(crops[:3], masks[:3], y[:2])
    with pytest.raises(ValueError, match="mask 0 has shape"):
        build_baseline("mean").fit(crops[:1], [np.zeros((3, 3), bool)], y[:1])
    y_none = y[:3].copy()
    y_none[:, 3] = np.nan
    with pytest.raises(ValueError, match="no labelled rows for contamination"):
        build_baseline("features_gbm").fit(crops[:3], masks[:3], y_none)
    with pytest.raises(RuntimeError, match="fit the baseline"):
        build_baseline("ice_filter").predict(crops[:1], masks[:1])


def test_resample_stack_averages_areas():
    rng = np.random.default_rng(4)
    x = rng.random((3, 50, 50)).astype(np.float32)
    out = resample_stack(x, 20)
    assert out.shape == (3, 20, 20)
    np.testing.assert_allclose(out.mean((1, 2)), x.mean((1, 2)), rtol=1e-5)
    a = area_matrix(50, 20)
    np.testing.assert_allclose(out[1], a @ x[1] @ a.T, atol=1e-6)
    np.testing.assert_allclose(resample_stack(np.ones((1, 7, 7)), 16), 1.0, atol=1e-6)


def test_square_features_respond_to_defects():
    rng = np.random.default_rng(5)
    s = 60
    clean = np.zeros((s, s), np.float32)
    clean[12:48, 12:48] = 0.7
    cracked = clean.copy()
    cracked[30, 12:48] = 1.0
    dirty = clean.copy()
    dirty[25:31, 25:31] = 0.02
    crops = [c + rng.normal(0, 0.005, c.shape).astype(np.float32) for c in (clean, cracked, dirty)]
    masks = [c > 0.15 for c in crops]
    crops.append(np.zeros((s, s), np.float32))  # an empty square: no open area at all
    masks.append(np.zeros((s, s), bool))
    x, names = square_features(crops, masks, FeatureConfig(size=64))
    assert x.shape == (4, len(names)) and len(set(names)) == len(names)
    assert np.isfinite(x).all()
    f = {name: x[:, i] for i, name in enumerate(names)}
    assert f["ridge_mean_s0.8"][1] > 3 * f["ridge_mean_s0.8"][0]
    assert f["bright_0.08"][1] > f["bright_0.08"][0]
    assert f["holes_frac"][2] > 0.02 and f["holes_frac"][0] == 0
    assert f["dark_blobs"][2] == 1 and f["dark_blobs"][0] == 0
    assert f["native_open_frac"][3] == 0 and f["native_mean"][3] == 0
    np.testing.assert_allclose(f["native_mean"][:3], open_area_mean(crops[:3], masks[:3]), 1e-5)
    # Squareness: the open square fills its bounding square; half of it does not.
    assert f["fill_min_square"][0] > 0.9
