# syntax=docker/dockerfile:1
# Chorus image: dependencies and a wheel built in a builder stage, a slim non-root runtime that
# works with a read-only root filesystem (writable: /tmp and the Prometheus multiprocess dir,
# both emptyDir mounts in the Helm chart).
#
# Right by construction: the dependency layer is installed from pyproject.toml's list (no
# placeholder package, no setuptools build/ left in the tree), and Chorus itself is installed
# from a wheel built from the real sources, so nothing of an earlier step can shadow them.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/chorus
WORKDIR /src
# Dependencies first: this layer is reused while only the source changes.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && /opt/chorus/bin/pip install -r /tmp/requirements.txt
COPY service ./service
# Chorus from a wheel of the real sources; the import check fails the build, not the pod, if the
# installed package is not the one just built; pip and setuptools stay in this stage.
RUN /opt/chorus/bin/pip wheel --no-deps --wheel-dir /tmp/wheels . \
    && /opt/chorus/bin/pip install --no-deps /tmp/wheels/chorus-*.whl \
    && cd / && /opt/chorus/bin/python -c "import chorus.app, chorus.cli; print('chorus', chorus.__version__)" \
    && /opt/chorus/bin/python -m pip uninstall -y -q pip setuptools \
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
