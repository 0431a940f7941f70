"""Settings that are derived from others."""

from __future__ import annotations

import pytest

from fanline.shared.settings import Settings


@pytest.mark.parametrize(
    ("redis_url", "queue_url", "one"),
    [
        ("redis://127.0.0.1:6379/0", "", True),  # the queue defaults to the events' Redis
        ("redis://127.0.0.1:6379/0?client_name=api", "redis://127.0.0.1:6379/0", True),  # a client name aside
        ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379/0", True),  # database 0 either way
        ("redis://127.0.0.1:6379/2", "redis://127.0.0.1:6379?db=2", True),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/1", False),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6380/0", False),
        ("redis://127.0.0.1:6379/0", "rediss://127.0.0.1:6379/0", False),
        ("redis://127.0.0.1:6379/0", "redis://user:pw@127.0.0.1:6379/0", False),
    ],
)
def test_one_redis_means_the_same_server_and_database(redis_url: str, queue_url: str, one: bool) -> None:
    assert Settings(redis_url=redis_url, queue_redis_url=queue_url).one_redis is one


def test_a_cluster_is_never_one_redis_with_the_queue() -> None:
    assert not Settings(redis_url="redis://127.0.0.1:7000", redis_cluster=True).one_redis
