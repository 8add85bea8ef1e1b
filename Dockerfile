# predgate online service. Builds with the legacy builder (DOCKER_BUILDKIT=0) as well as BuildKit: no
# `# syntax` line (BuildKit would pull a frontend image) and no RUN --mount. docs/containers.md has the
# details and measured figures.
#
#   CPU, bundle mounted at /bundle:   docker build --target cpu -t predgate:cpu .
#                                     docker run --read-only --tmpfs /tmp -p 8000:8000 \
#                                       -v $PWD/bundles/fashion-mnist-quick:/bundle:ro predgate:cpu
#   GPU (needs the NVIDIA container toolkit; run with --gpus all):
#                                     docker build --target gpu -t predgate:gpu .
#   CPU, bundle built in (BuildKit):  docker build --target cpu-bundled -t predgate:bundled \
#                                       --build-context bundle=bundles/fashion-mnist-quick .
#   the same with the legacy builder (the bundle directory as the context of a two-line build):
#     printf 'FROM predgate:cpu\nCOPY --chown=10001:10001 . /bundle\n' \
#       | docker build -t predgate:bundled -f - bundles/fashion-mnist-quick
#
# The legacy builder builds every stage up to the target, in file order, whatever the target needs:
# always pass --target there (cpu comes first, so it builds nothing else). BuildKit builds only what
# the target needs; without --target it builds the last stage, which is cpu again.
#
# Build arguments:
#   PYTHON_IMAGE     base image with Python 3.11 (python:3.11-slim). Where Docker Hub cannot be reached,
#                    build a base from Debian packages (deploy/docker/build-base.sh, `make docker-base`)
#                    and pass --build-arg PYTHON_IMAGE=predgate-base:bookworm. The packages go into a venv
#                    (/opt/venv), which works on both: Debian's own python refuses system-wide pip (PEP 668).
#   EXTRA_CA_CERTS   PEM text of CA certificates to trust during the build, e.g. a TLS-inspecting proxy's:
#                    --build-arg EXTRA_CA_CERTS="$(cat proxy-ca.pem)". Added to the system bundle, which pip
#                    is then told to use. CA certificates are public, so an argument (visible in the image
#                    history) is fine; docs/containers.md shows a BuildKit secret instead.
#   TORCH_INDEX_URL  where PyTorch's CPU wheel index is reachable, https://download.pytorch.org/whl/cpu
#                    gives a much smaller CPU image; the default PyPI wheel carries CUDA libraries and runs
#                    on either.
#
# Settings are PREDGATE_* environment variables (service/settings.py). The image runs as uid 10001 and needs
# no writable path but /tmp: `docker run --read-only --tmpfs /tmp` works. SIGTERM stops it gracefully.
# A mounted bundle must be readable by that uid (predgate build writes its files 0600: chmod -R a+rX).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
ARG TORCH_INDEX_URL=
ARG EXTRA_CA_CERTS=
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    PREDGATE_BUNDLE=/bundle \
    PREDGATE_HOST=0.0.0.0 \
    PREDGATE_PORT=8000 \
    PREDGATE_NO_PROGRESS=1
WORKDIR /app
# Extra CAs into the system bundle, and pip pointed at that bundle (pip otherwise trusts only its own
# certifi copy); then the venv every later pip and the service run in.
RUN if [ -n "$EXTRA_CA_CERTS" ]; then \
        printf '%s\n' "$EXTRA_CA_CERTS" > /usr/local/share/ca-certificates/predgate-extra.crt \
        && update-ca-certificates >/dev/null \
        && printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > /etc/pip.conf; \
    fi \
    && python3 -m venv /opt/venv
RUN pip install ${TORCH_INDEX_URL:+--index-url ${TORCH_INDEX_URL}} torch==2.14.1 torchvision==0.29.1
# The dependencies from pyproject alone (empty package directories stand in for the sources), so that
# an edit of the sources rebuilds only the last, small layer instead of downloading everything again.
COPY pyproject.toml README.md ./
RUN mkdir models offline service bench cli \
    && pip install . && pip uninstall -y predgate \
    && python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.14.1')" \
    && rm -rf models offline service bench cli build ./*.egg-info
COPY models ./models
COPY offline ./offline
COPY service ./service
COPY bench ./bench
COPY cli ./cli
# Installed (not editable; setuptools is in the venv already), then the build's leftovers go.
RUN pip install --no-deps --no-build-isolation . \
    && rm -rf build ./*.egg-info \
    && useradd --system --uid 10001 --user-group --home-dir /app --shell /usr/sbin/nologin predgate \
    && mkdir -p /bundle && chown predgate:predgate /bundle
EXPOSE 8000
# Ready = bundle loaded and warmed up (503 before); python instead of curl, which the slim image lacks.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('PREDGATE_PORT', '8000'), timeout=4)"]
# SIGTERM: uvicorn stops accepting, finishes in-flight requests, the batcher drains, then exit.
STOPSIGNAL SIGTERM
USER predgate
CMD ["python", "-m", "service.server"]

# CPU, bundle mounted at /bundle. First after base, so that the legacy builder builds nothing else for it.
FROM base AS cpu
ENV PREDGATE_DEVICE=cpu

# GPU: CUDA torch (PyPI's default wheel) and onnxruntime-gpu instead of onnxruntime; CUDA when present.
FROM base AS gpu
USER root
RUN pip uninstall -y onnxruntime && pip install "onnxruntime-gpu>=1.17"
ENV PREDGATE_DEVICE=auto
USER predgate

# CPU with the bundle inside the image, from the named build context "bundle": BuildKit only (the legacy
# builder would try to pull an image called "bundle"; see the two-line alternative at the top).
FROM cpu AS cpu-bundled
COPY --from=bundle --chown=predgate:predgate . /bundle

# No --target (BuildKit): the CPU image.
FROM cpu AS default
