"""File I/O: atlas readers and writers (EPU, SerialEM, MRC) and atomic writes.

Everything that touches files lives here; the rest of ``xcryonet`` works on arrays.
"""

from xcryonet.io.atlas import (
    Atlas,
    SoftwareSquare,
    Tile,
    centred_affine,
    fit_affine,
    fit_stage_affine,
)
from xcryonet.io.epu import parse_atlas_dm, parse_microscope_image, write_epu_atlas
from xcryonet.io.mrc import read_mrc, read_mrc_header, write_mrc
from xcryonet.io.read import grid_id_for, inspect_atlas, read_atlas
from xcryonet.io.serialem import parse_mdoc, write_serialem_montage
from xcryonet.io.stitch import stitch_tiles

__all__ = [
    "Atlas",
    "SoftwareSquare",
    "Tile",
    "centred_affine",
    "fit_affine",
    "fit_stage_affine",
    "grid_id_for",
    "inspect_atlas",
    "parse_atlas_dm",
    "parse_mdoc",
    "parse_microscope_image",
    "read_atlas",
    "read_mrc",
    "read_mrc_header",
    "stitch_tiles",
    "write_epu_atlas",
    "write_mrc",
    "write_serialem_montage",
]
