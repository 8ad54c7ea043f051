# BN Scope: the server with its dashboard on port 8000, runs stored in the /data volume.
#
#   docker build -t bnscope .                                          # CPU torch
#   docker build --build-arg TORCH_VARIANT=cu128 -t bnscope:cuda .     # CUDA torch (--gpus all)
#   docker run -p 8000:8000 -v bnscope-data:/data bnscope
#
# scripts/check_docker.sh lints, builds, starts and checks this image.
FROM python:3.11-slim

# torch wheels come from PyTorch's index: cpu, or a CUDA build such as cu128.
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/bnscope \
    PATH=/opt/bnscope/bin:$PATH \
    BNSCOPE_HOST=0.0.0.0 \
    BNSCOPE_PORT=8000 \
    BNSCOPE_DATA_DIR=/data \
    BNCORE_CACHE_DIR=/data/cache

# g++ builds bncore's fused CPU kernel on first use (cached in the volume); without it the
# reference kernel runs. Not version-pinned: the base image's Debian release pins it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home bnscope \
    && mkdir /data \
    && chown bnscope:bnscope /data

# The heaviest layer first, so that changes to the code rebuild only what follows.
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --index-url "$TORCH_INDEX/$TORCH_VARIANT" "torch==$TORCH_VERSION"

WORKDIR /app
COPY pyproject.toml ./
# the dependencies and the PostgreSQL driver (the postgres extra): --database-url works as is
RUN python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['postgres']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY bncore ./bncore
COPY bnscope ./bnscope
COPY server ./server
COPY dashboard ./dashboard
RUN pip install --no-deps . \
    && rm -rf /app/build

USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('BNSCOPE_PORT', '8000'), timeout=4)"]
CMD ["bnscope", "serve"]
