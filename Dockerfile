# tts-gateway: CPU by default (PyTorch's CPU-only build); `--build-arg TORCH=cuda` for the CUDA build.
# The base is an argument so a mirror or a locally built Debian bookworm + python3-venv can stand in.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG TORCH=cpu
ARG TORCH_VERSION=
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir --upgrade pip setuptools wheel
# The dependencies first, from pyproject.toml alone (an empty package and README stand in), so a change
# to the code or the README rebuilds only the last, small layer; the same install script as `make install`.
COPY scripts/install-python.sh /src/scripts/
COPY pyproject.toml /src/
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir -p /src/tts_gateway && touch /src/tts_gateway/__init__.py /src/README.md \
    && TORCH_VERSION="$TORCH_VERSION" /src/scripts/install-python.sh /opt/venv/bin/pip "$TORCH" "/src[postgres]" \
    && rm -rf /src/tts_gateway /src/README.md /src/build /src/*.egg-info  # setuptools would reuse the stub's build
COPY README.md /src/
COPY tts_gateway /src/tts_gateway
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --force-reinstall /src

FROM ${BASE_IMAGE}
# espeak-ng for the espeak engine; the gateway's own user (no shell, no root) owns the data volume.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends espeak-ng \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --home-dir /data --no-create-home --shell /usr/sbin/nologin tts \
    && mkdir /data && chown tts:tts /data
COPY --from=build /opt/venv /opt/venv
# Everything the gateway writes lives in the one volume /data: registry, Kokoro's assembled model,
# Piper voices pulled later, XTTS v2 (Hugging Face cache) and other caches.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/data \
    XDG_CACHE_HOME=/data/cache \
    HF_HOME=/data/huggingface \
    TTS_HOME=/data/tts \
    TTS_GATEWAY_DATA_DIR=/data \
    TTS_GATEWAY_HOST=0.0.0.0 \
    TTS_GATEWAY_PORT=8001
VOLUME /data
WORKDIR /data
USER tts
# 10200: Wyoming, served when TTS_GATEWAY_WYOMING_URI=tcp://0.0.0.0:10200 is set.
EXPOSE 8001 10200
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['TTS_GATEWAY_PORT'] + '/health', timeout=4)"]
ENTRYPOINT ["tts-gateway"]
CMD ["serve"]
