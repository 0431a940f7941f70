"""fanline: stream LLM output to many clients at once, with exact resume.

The installed packages all live under this one name: ``fanline.api`` (the API pod),
``fanline.worker`` (the generation worker), ``fanline.shared`` (what both need),
``fanline.cli`` and ``fanline.bench``. In the repository they are the top-level folders
``api/``, ``worker/``, ``shared/``, ``cli/`` and ``bench/`` (see pyproject.toml).

What an app uses is re-exported here: the consumer ``watch`` (client.py) and the
producer, ``Producer`` / ``SyncProducer`` (producer.py).
"""

from fanline.client import GenerationError, Update, WatchError, watch
from fanline.producer import Generation, Producer, SyncGeneration, SyncProducer
from fanline.shared.errors import Cancelled, Disowned, GenerationFailed, Stopped
from fanline.shared.settings import Settings

__all__ = [
    "Cancelled",
    "Disowned",
    "Generation",
    "GenerationError",
    "GenerationFailed",
    "Producer",
    "Settings",
    "Stopped",
    "SyncGeneration",
    "SyncProducer",
    "Update",
    "WatchError",
    "watch",
]
