"""The installed package is complete and has one import name: a wheel built from the repo
carries every module and the demo page's files under ``fanline/`` and nothing else top-level
(regressions: api/static was once left out of non-editable installs, so `fanline api` failed
at import in the Docker image; the packages were once installed as top-level ``api``,
``shared``, ``worker``..., which collided with any app's own modules of those names)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.typecheck import package_dir

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
    assert static and {f"fanline/api/static/{name}" for name in static} <= names
    # Every folder of Python code in the repository is in the wheel, under fanline/.
    for name, folder in package_dir().items():
        for init in (REPO / folder).rglob("__init__.py"):
            inside = init.relative_to(REPO / folder).as_posix()
            assert f"{name.replace('.', '/')}/{inside}" in names, f"{folder}/{inside} is not packaged"
    top_level = {name.split("/")[0] for name in names if not name.startswith("fanline-")}
    assert top_level == {"fanline"}


def test_the_repository_folders_are_not_importable_top_level_once_installed() -> None:
    # Outside the repository (cwd and sys.path without it), only fanline.* imports.
    names = ("api", "shared", "worker", "cli", "bench")
    probe = f"import importlib.util as u, fanline.api.app; print([n for n in {names} if u.find_spec(n)])"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd="/", capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
