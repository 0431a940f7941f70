"""shared/cluster.py: the keys of XREAD/XREADGROUP, found without asking a node (issue 13, point 2).

The cluster behaviour itself (a failing node stalls only its own commands) is pinned on a
real cluster in tests/cluster/test_failover_blast_radius.py.
"""

from __future__ import annotations

import pytest
from redis.exceptions import RedisClusterException

from fanline.shared.cluster import stream_keys


@pytest.mark.parametrize(
    ("command", "args", "keys"),
    [
        ("XREAD", ("STREAMS", "a", "0-0"), ["a"]),
        ("XREAD", (b"COUNT", 64, b"BLOCK", 5000, b"STREAMS", b"a", b"b", b"1-0", b"2-0"), [b"a", b"b"]),
        ("XREAD", ("block", 0, "streams", "count", "0-0"), ["count"]),  # a key named like an option
        ("XREADGROUP", ("GROUP", "streams", "c", "COUNT", 1, "NOACK", "STREAMS", "k", ">"), ["k"]),
    ],
)
def test_stream_keys_are_those_after_streams(command: str, args: tuple[object, ...], keys: list[object]) -> None:
    assert stream_keys(command, args) == keys


@pytest.mark.parametrize("args", [(), ("COUNT", 1), ("STREAMS", "a"), ("STREAMS", "a", "b", "0-0")])
def test_malformed_reads_are_refused(args: tuple[object, ...]) -> None:
    with pytest.raises(RedisClusterException):
        stream_keys("XREAD", args)
