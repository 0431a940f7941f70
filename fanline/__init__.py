"""fanline: stream LLM output to many clients at once, with exact resume.

The installed packages all live under this one name: ``fanline.api`` (the API pod),
``fanline.worker`` (the generation worker), ``fanline.shared`` (what both need),
``fanline.cli`` and ``fanline.bench``. In the repository they are the top-level folders
``api/``, ``worker/``, ``shared/``, ``cli/`` and ``bench/`` (see pyproject.toml).
"""

from fanline.client import GenerationError, Update, WatchError, watch

__all__ = ["GenerationError", "Update", "WatchError", "watch"]
