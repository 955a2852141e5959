# syntax=docker/dockerfile:1
# sidecar: a reverse proxy that makes a stream-first server's events readable as state.
#
#   docker build -t sidecar .
#   docker run -p 8080:8080 -p 9901:9901 -e SIDECAR_UPSTREAM=http://gptme:5700 sidecar
#
# Every option is an environment variable (SIDECAR_*); see the README. The
# admin port listens on every address (for the kubelet's probes) and, without
# an admin token (SIDECAR_ADMIN_TOKEN_FILE, a mounted secret), serves only
# /healthz and /readyz: metrics and the state API need the token.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
COPY sidecar ./sidecar
COPY config ./config
# Wheels for the pinned dependencies and for the project itself (no deps: the
# lock file is the only source of versions).
RUN pip wheel --no-cache-dir --wheel-dir /wheels -r requirements.lock \
 && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SIDECAR_HOST=0.0.0.0 \
    SIDECAR_PORT=8080 \
    SIDECAR_ADMIN_PORT=9901 \
    SIDECAR_ADMIN_HOST=0.0.0.0 \
    SIDECAR_STORE=sqlite:/var/lib/sidecar/state.db
# Snapshots outlive a restart in this volume (a Kubernetes emptyDir survives
# container restarts within the pod).
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sidecar \
 && mkdir -p /var/lib/sidecar && chown 10001:10001 /var/lib/sidecar
VOLUME /var/lib/sidecar
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels /wheels/*.whl \
 && rm -rf /wheels
USER 10001:10001
EXPOSE 8080 9901
# /healthz is on the admin port (wherever SIDECAR_ADMIN_PORT puts it) and
# never depends on the upstream.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SIDECAR_ADMIN_PORT', '9901'), timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["sidecar"]
