# syntax=docker/dockerfile:1
# Chorus image: wheels built in a builder stage, a slim non-root runtime that works with a
# read-only root filesystem (writable: /tmp and the Prometheus multiprocess dir, both emptyDir
# mounts in the Helm chart).

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/chorus
WORKDIR /src
# Dependencies first: this layer is reused while only the source changes.
COPY pyproject.toml README.md ./
RUN mkdir -p service/chorus && touch service/chorus/__init__.py \
    && /opt/chorus/bin/pip install . \
    && /opt/chorus/bin/pip uninstall -y chorus
COPY service ./service
RUN /opt/chorus/bin/pip install --no-deps . \
    && /opt/chorus/bin/python -m compileall -q /opt/chorus

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="chorus" \
      org.opencontainers.image.description="Horizontally scaled real-time chat: stateless replicas over Redis pub/sub" \
      org.opencontainers.image.licenses="MIT"
# A numeric user that exists in no host /etc/passwd, so runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 chorus \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin chorus
COPY --from=builder --chown=root:root /opt/chorus /opt/chorus
ENV PATH=/opt/chorus/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CHORUS_WORKERS=1 \
    CHORUS_LOG_FORMAT=json
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
# Chorus drains on SIGTERM (readyz 503, sockets closed with 1012 over CHORUS_DRAIN_SECONDS,
# exit 0); gunicorn's graceful timeout is CHORUS_DRAIN_SECONDS + 10. No HEALTHCHECK: Kubernetes
# probes /livez and /readyz.
STOPSIGNAL SIGTERM
CMD ["chorus", "serve", "--host", "0.0.0.0", "--port", "8000"]
