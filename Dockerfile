# One image for both roles:
#   docker run IMAGE                  -> an API pod   (fanline api --host 0.0.0.0 --port 8000)
#   docker run IMAGE worker           -> a worker     (fanline worker)
# Configuration is FANLINE_* environment variables only (README: Configuration).
#
# Stage 1 builds a virtualenv with fanline and its runtime dependencies (never the
# [test] extra); stage 2 copies that virtualenv into a clean slim image that runs
# as an unprivileged user and can run with a read-only root filesystem.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/fanline

WORKDIR /src
COPY pyproject.toml README.md ./
COPY fanline ./fanline
COPY api ./api
COPY worker ./worker
COPY shared ./shared
COPY cli ./cli
COPY bench ./bench
RUN /opt/fanline/bin/pip install .


FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime

# tini as PID 1: forwards SIGTERM to fanline (which drains) and reaps zombies.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 fanline \
    && useradd --system --uid 10001 --gid fanline --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin fanline

COPY --from=build /opt/fanline /opt/fanline

ENV PATH=/opt/fanline/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /tmp
USER 10001:10001
EXPOSE 8000

# SIGTERM is what drains: an API pod tells its streams to resume elsewhere, a worker
# finishes its generations within FANLINE_WORKER_GRACE_S. Give it time to (compose:
# stop_grace_period; Kubernetes: terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM

# Checks the API role (/healthz: the process is alive). A worker has no HTTP port:
# docker-compose.yml disables this check for the worker service.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]

ENTRYPOINT ["tini", "--", "fanline"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
