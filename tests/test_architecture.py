"""The core never imports the runners' frameworks (STYLE.md: prefect, mlflow, streamlit)."""

import subprocess
import sys
from pathlib import Path

import xcryonet

CORE_MODULES = sorted(
    "xcryonet." + ".".join(p.relative_to(Path(xcryonet.__file__).parent).with_suffix("").parts)
    for p in Path(xcryonet.__file__).parent.rglob("*.py")
    if p.name != "__init__.py"
)


def test_core_does_not_import_frameworks():
    code = (
        "import sys, importlib\n"
        f"for m in {CORE_MODULES!r}: importlib.import_module(m)\n"
        "bad = [m for m in ('prefect', 'mlflow', 'streamlit') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    assert len(CORE_MODULES) >= 5
