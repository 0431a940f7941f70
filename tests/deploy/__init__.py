"""Helpers for the deployment tests: finding the tools, and deploy/nginx.conf for loopback.

conf = render_nginx_conf(["127.0.0.1:8001", "127.0.0.1:8002"], "127.0.0.1:8080", tmp_dir)
subprocess.Popen(nginx_args(conf))      # nginx -p tmp_dir/ -c conf -g 'daemon off; pid …;'
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NGINX_CONF = REPO / "deploy" / "nginx.conf"


def find_tool(name: str, hint: str) -> str:
    """A tool from the venv, the PATH or /usr/sbin; the test fails with ``hint`` when it is missing."""
    for candidate in (Path(sys.executable).parent / name, shutil.which(name), Path("/usr/sbin") / name):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail(f"{name} is not installed: {hint}")


def render_nginx_conf(upstreams: list[str], listen: str, prefix: Path) -> Path:
    """deploy/nginx.conf with only its upstream ``server`` lines and its ``listen`` address replaced."""
    text = NGINX_CONF.read_text()
    block = re.search(r"upstream fanline_api \{(.*?)\n    \}", text, re.S)
    assert block is not None, "deploy/nginx.conf has no `upstream fanline_api { ... }` block"
    lines = block.group(1).split("\n")
    servers = [i for i, line in enumerate(lines) if re.match(r"\s*server\s", line)]
    assert servers, "the upstream block has no server lines"
    first = lines[servers[0]]
    indent = first[: len(first) - len(first.lstrip())]
    options = " ".join(first.strip().removesuffix(";").split()[2:])  # max_fails=… fail_timeout=…
    new = [f"{indent}server {address} {options};".replace(" ;", ";") for address in upstreams]
    kept = [line for i, line in enumerate(lines) if i not in servers]
    lines = [*kept[: servers[0]], *new, *kept[servers[0] :]]
    text = text[: block.start(1)] + "\n".join(lines) + text[block.end(1) :]
    assert len(re.findall(r"^\s*listen\s", text, re.M)) == 1, "deploy/nginx.conf must have one listen directive"
    text = re.sub(r"^(\s*listen\s+)\S+;", lambda m: f"{m.group(1)}{listen};", text, flags=re.M)
    prefix.mkdir(parents=True, exist_ok=True)
    path = prefix / "nginx.conf"
    path.write_text(text)
    return path


def nginx_args(conf: Path) -> list[str]:
    """nginx in the foreground with ``conf``; its pid file beside it."""
    nginx = find_tool("nginx", "apt-get install nginx-light (or nginx)")
    prefix = conf.parent
    return [nginx, "-p", f"{prefix}/", "-c", str(conf), "-g", f"daemon off; pid {prefix}/nginx.pid;"]
