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

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /src
# dependencies first, so code changes do not reinstall vLLM
COPY pyproject.toml README.md ./
COPY pruner ./pruner
COPY runtime ./runtime
COPY serve ./serve
RUN pip install --upgrade pip && pip install ".[gpu]"

RUN useradd --create-home --uid 1000 mixsparse
USER mixsparse
WORKDIR /home/mixsparse

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["mixsparse", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["/models/artifact"]
