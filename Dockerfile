# syntax=docker/dockerfile:1.6
# predgate online service.
#
#   CPU, bundle mounted at /bundle:   docker build -t predgate:cpu .
#                                     docker run -p 8000:8000 -v $PWD/bundles/fashion-mnist-quick:/bundle:ro predgate:cpu
#   CPU, bundle built in:             docker build --target cpu-bundled \
#                                       --build-context bundle=bundles/fashion-mnist-quick -t predgate:bundled .
#   GPU (needs the NVIDIA container toolkit; run with --gpus all):
#                                     docker build --target gpu -t predgate:gpu .
#
# Settings are PREDGATE_* environment variables (service/settings.py). Where PyTorch's CPU wheel index
# is reachable, --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu gives a much smaller
# CPU image; the default PyPI wheel carries CUDA libraries and runs on either.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
ARG TORCH_INDEX_URL=
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREDGATE_BUNDLE=/bundle \
    PREDGATE_HOST=0.0.0.0 \
    PREDGATE_PORT=8000 \
    PREDGATE_NO_PROGRESS=1
WORKDIR /app
RUN pip install ${TORCH_INDEX_URL:+--index-url ${TORCH_INDEX_URL}} torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY models ./models
COPY offline ./offline
COPY service ./service
COPY bench ./bench
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin predgate \
    && mkdir -p /bundle && chown predgate:predgate /bundle
EXPOSE 8000
# Ready = bundle loaded and warmed up (503 before); python instead of curl, which the slim image lacks.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('PREDGATE_PORT', '8000'), timeout=4)"]
# SIGTERM: uvicorn stops accepting, finishes in-flight requests, the batcher drains, then exit.
STOPSIGNAL SIGTERM
USER predgate
CMD ["python", "-m", "service.server"]

# GPU: CUDA torch (PyPI's default wheel) and onnxruntime-gpu instead of onnxruntime; CUDA when present.
FROM base AS gpu
USER root
RUN pip uninstall -y onnxruntime && pip install "onnxruntime-gpu>=1.17"
ENV PREDGATE_DEVICE=auto
USER predgate

# CPU with the bundle inside the image (from the named build context "bundle").
FROM base AS cpu-bundled
ENV PREDGATE_DEVICE=cpu
COPY --from=bundle --chown=predgate:predgate . /bundle

# Default target: CPU, bundle mounted at /bundle.
FROM base AS cpu
ENV PREDGATE_DEVICE=cpu
