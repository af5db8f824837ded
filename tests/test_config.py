from pathlib import Path

import pytest
import yaml

from xcryonet.config import Params, load_params, to_dict
from xcryonet.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_mirrors_defaults():
    """params.yaml holds every setting, and equals the dataclass defaults (the demo defaults)."""
    assert load_params(ROOT / "params.yaml") == Params()
    on_disk = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert on_disk == to_dict(Params())


def test_unknown_key_rejected(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("extract:\n  crop_pix: 10\n")
    with pytest.raises(InputError, match=r"unknown key 'extract.crop_pix'"):
        load_params(p)


def test_unknown_section_rejected(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("extrakt:\n  crop_px: 10\n")
    with pytest.raises(InputError, match="extrakt"):
        load_params(p)


@pytest.mark.parametrize(
    "text",
    [
        "extract:\n  crop_px: 'big'\n",
        "extract:\n  crop_px: 1.5\n",
        "extract:\n  crop_px: true\n",
        "simulate:\n  meshes: 200\n",
        "simulate:\n  pixel_size_um: [1]\n",
        "extract: 3\n",
    ],
)
def test_wrong_type_rejected(tmp_path, text):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    with pytest.raises(InputError) as err:
        load_params(p)
    assert str(p) in str(err.value) and "\n" not in str(err.value)


def test_overrides_parse_yaml_values(tmp_path):
    params = load_params(None, ["extract.crop_px=512", "simulate.meshes=[300]"])
    assert params.extract.crop_px == 512
    assert params.simulate.meshes == (300,)
    # ints are accepted where floats are expected
    assert load_params(None, ["simulate.pixel_size_um=1"]).simulate.pixel_size_um == 1.0


def test_bad_override_rejected():
    with pytest.raises(InputError, match="section.key=value"):
        load_params(None, ["extract.crop_px"])
    with pytest.raises(InputError, match="unknown key"):
        load_params(None, ["extract.nope=1"])


def test_config_is_frozen():
    params = Params()
    with pytest.raises(AttributeError):
        params.extract.crop_px = 3  # type: ignore[misc]


def test_bad_training_settings_are_clear_errors(tmp_path):
    for override, word in (
        ("train.labelled_fraction=1.5", "labelled_fraction"),
        ("train.fusion_squares=-1", "fusion_squares"),
        ("train.lr_schedule=step", "lr_schedule"),
    ):
        with pytest.raises(InputError, match=word):
            load_params(None, [override])


def test_paper_profile_gives_valid_overrides(tmp_path):
    from pathlib import Path

    from xcryonet.config import load_params, profile_overrides

    root = Path(__file__).resolve().parents[1]
    flags = profile_overrides(root / "profiles" / "paper.yaml")
    assert "model.input_px=640" in flags and "train.epochs=75" in flags
    params = load_params(root / "params.yaml", flags)
    assert params.model.input_px == 640 and params.train.epochs == 75
    assert params.extract == load_params(root / "params.yaml").extract  # only what it names
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: many}\n")
    with pytest.raises(InputError, match="epochs must be an integer") as err:
        profile_overrides(bad)
    assert str(bad) in str(err.value)
    bad.write_text("- not a mapping\n")
    with pytest.raises(InputError, match="mapping of sections"):
        profile_overrides(bad)


def test_named_params_file_must_exist(tmp_path, monkeypatch):
    # A mistyped path is an error naming it, not a silent run on the defaults.
    with pytest.raises(InputError, match=r"tuned\.yml: does not exist"):
        load_params(tmp_path / "tuned.yml")
    # The default name is optional: outside a project (no params.yaml here) the defaults.
    monkeypatch.chdir(tmp_path)
    assert load_params() == Params()
    assert load_params("params.yaml", ["train.epochs=3"]).train.epochs == 3
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 5\n")
    assert load_params().train.epochs == 5
