"""``mypy --strict`` over the code as it is imported, ``fanline.*``, the tests and the examples.

The repository keeps its folders (``api/``, ``worker/``, ...) at the top and pyproject.toml
maps them to ``fanline.api``, ``fanline.worker``, ... mypy cannot follow that mapping (nor
the editable install's import hook), so this lays a tree of symbolic links in that shape in
a temporary folder and runs mypy there. ``make typecheck`` and tests/test_lint.py use it.

    python -m tests.typecheck
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def package_dir() -> dict[str, str]:
    """pyproject.toml's mapping of import names to folders: ``{"fanline.api": "api", ...}``."""
    mapping: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return mapping


def link_tree(into: Path) -> None:
    """``into/fanline``, ``into/tests`` and ``into/examples`` as the installed package and the tests see them."""
    mapping = package_dir()
    (into / "fanline").mkdir()
    for entry in (ROOT / mapping["fanline"]).iterdir():
        if entry.name != "__pycache__":
            (into / "fanline" / entry.name).symlink_to(entry)
    for name, folder in mapping.items():
        if name != "fanline":
            (into / "fanline" / name.removeprefix("fanline.")).symlink_to(ROOT / folder)
    (into / "tests").symlink_to(ROOT / "tests")
    (into / "examples").symlink_to(ROOT / "examples")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="fanline-mypy-") as tmp:
        link_tree(Path(tmp))
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "mypy",
                "--config-file",
                str(ROOT / "pyproject.toml"),
                "--cache-dir",
                str(ROOT / ".mypy_cache"),
                "-p",
                "fanline",
                "-p",
                "tests",
                "-p",
                "examples",
            ],
            cwd=tmp,
            capture_output=True,
            text=True,
        )
    out = done.stdout.replace(tmp + "/", "")
    for name, folder in package_dir().items():  # report the repository's paths
        out = out.replace(name.replace(".", "/") + "/", folder + "/")
    sys.stdout.write(out)
    sys.stderr.write(done.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
