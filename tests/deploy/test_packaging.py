"""The installed package is complete: a wheel built from the repo carries every module and
the demo page's files (regression: api/static was once left out of non-editable installs,
so `fanline api` failed at import in the Docker image)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_carries_the_static_files_and_every_package(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        timeout=120,
    )
    (wheel,) = tmp_path.glob("fanline-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    static = {p.name for p in (REPO / "api" / "static").iterdir() if p.is_file()}
    assert static and {f"api/static/{name}" for name in static} <= names
    for package in ("api", "api/transports", "worker", "worker/generators", "shared", "cli", "bench"):
        assert f"{package}/__init__.py" in names
    assert not any(name.startswith("tests/") for name in names)
