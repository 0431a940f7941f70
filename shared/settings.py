"""Settings, read once from ``FANLINE_*`` environment variables into one typed object.

settings = Settings()            # reads the environment
settings = Settings(retention_s=60)  # explicit values win (tests)
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FANLINE_", extra="ignore")

    # Redis holding the event streams and generation metadata.
    redis_url: str = DEFAULT_REDIS_URL
    redis_cluster: bool = False
    # Redis for the arq job queue (never a cluster); empty means redis_url.
    queue_redis_url: str = ""
    queue_name: str = "fanline:queue"

    generator: str = "demo"
    upstream_base_url: str = ""
    upstream_api_key: str = ""
    upstream_model: str = ""
    upstream_timeout_s: float = Field(60.0, gt=0)
    # Demo pace; 0 means as fast as possible (the benchmark's "no delay").
    demo_tokens_per_s: float = Field(30.0, ge=0)

    api_keys: str = ""
    watch_token_secret: str = ""
    watch_token_ttl_s: int = Field(7 * 24 * 3600, ge=60)
    # Comma-separated origins allowed by CORS ("*" for any); empty: CORS off.
    cors_origins: str = ""
    retention_s: int = Field(3600, ge=1)
    # Per-API-key limits, enforced only with auth on (api/limits.py); 0 = unlimited.
    # Generations of one key queued or running at once:
    key_max_concurrent: int = Field(0, ge=0)
    # Generation-creating requests of one key in any 60 s:
    key_rate_per_min: int = Field(0, ge=0)

    # Request limits.
    max_body_bytes: int = Field(1_048_576, ge=1024)
    max_messages: int = Field(1000, ge=1)
    max_tokens_limit: int = Field(32_768, ge=1)

    # One stream holds at most this many entries (trimmed approximately), so a
    # runaway generation cannot exhaust Redis memory.
    stream_max_events: int = Field(100_000, ge=100)
    # Events each API pod keeps in memory per watched generation; viewers further
    # behind read Redis history at their own pace.
    hub_buffer_events: int = Field(1024, ge=16)
    # Largest number of events written to one viewer in one write.
    hub_batch_events: int = Field(256, ge=1)
    # Most direct writes a second to caught-up viewers of one generation (api/hub.py Topic):
    # with more viewers than this allows at one write per event, events are coalesced.
    # 0: one write per event, however many viewers.
    hub_writes_per_s: float = Field(70_000, ge=0)
    hub_block_ms: int = Field(2000, ge=10)
    heartbeat_s: float = Field(15.0, gt=0, le=15.0)
    # A viewer whose connection accepts no bytes for this long is cut off (it can resume).
    slow_viewer_timeout_s: float = Field(30.0, gt=0)
    # Cancel a generation that has had no viewer for this long; 0 = never.
    idle_cancel_s: float = Field(0.0, ge=0)

    worker_max_jobs: int = Field(100, ge=1)
    # arq's fallback polling; job start does not wait on it (see worker/main.py).
    worker_poll_delay_s: float = Field(0.5, gt=0)
    worker_heartbeat_s: float = Field(1.0, gt=0)
    # A running generation whose heartbeat is older than this is ended with a
    # "worker_lost" error by any reaper (API pods and workers run one).
    worker_lost_after_s: float = Field(5.0, gt=0)
    reap_interval_s: float = Field(2.0, gt=0)
    # On SIGTERM a worker finishes its generations for up to this long, then ends
    # the rest with an explicit "worker_shutdown" error.
    worker_grace_s: float = Field(25.0, ge=0)
    # Port of a worker's Prometheus metrics (/metrics); 0: not served.
    worker_metrics_port: int = Field(0, ge=0, le=65535)

    # API pod: connections it holds at most (past it, new ones get 503), and how
    # long a SIGTERM drain may take before the remaining connections are cut.
    max_connections: int = Field(19_000, ge=1)
    drain_timeout_s: float = Field(10.0, ge=0)
    # A request's headers must arrive within this long, its body within body_timeout_s.
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)

    # Durable Streams (/v1/streams/, api/streams.py): the largest POST/PUT body, the largest
    # stream (bytes of data appended, 0 = unlimited), the longest Stream-TTL or time until a
    # Stream-Expires-At (0 = unlimited), how long a stream without either stays in Redis after
    # its last read or write, and how long a long-poll waits before its 204.
    ds_max_body_bytes: int = Field(4 * 1_048_576, ge=1024)
    ds_max_stream_bytes: int = Field(0, ge=0)
    ds_max_ttl_s: int = Field(0, ge=0)
    ds_retention_s: int = Field(7 * 24 * 3600, ge=60)
    ds_long_poll_timeout_s: float = Field(10.0, gt=0, le=60.0)
    # Most bytes of data one catch-up read answers with (a client reads on from its offset).
    ds_max_read_bytes: int = Field(8 * 1_048_576, ge=1024)

    log_level: str = "info"
    log_format: Literal["text", "json"] = "text"
    # Log prompts at debug level (never on by default: prompts are users' data).
    log_content: bool = False

    @property
    def queue_url(self) -> str:
        return self.queue_redis_url or self.redis_url

    @property
    def one_redis(self) -> bool:
        """The job queue and the events are on the same (non-cluster) Redis: a generation's
        metadata and its job can then be written in one round trip."""
        return not self.redis_cluster and _server(self.queue_url) == _server(self.redis_url)

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]


def _server(url: str) -> tuple[str, str, str]:
    """The server and database a Redis URL names; its other options (a client name) aside."""
    parts = urlsplit(url)
    db = parts.path.strip("/") or parse_qs(parts.query).get("db", ["0"])[0]
    return parts.scheme, parts.netloc, db
