# One image for a single GPU box, the nodes of a Ray cluster and KubeRay pods: Ray, Serve, torch (CUDA) and serve_app.
#   docker build -t ray-sd-serve:0.1.0 .
#   docker build --build-arg PRELOAD_MODEL=stabilityai/sd-turbo -t ray-sd-serve:0.1.0-sd-turbo .   (weights inside)
#   docker run --gpus all -p 8000:8000 ray-sd-serve:0.1.0       (runs serve_config.yaml; see README "Deploying")
ARG CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_BASE}

# Same torch as the Makefile's TORCH_VERSION, same Ray as deploy/kuberay/rayservice.yaml's rayVersion (tests check).
ARG TORCH_VERSION=2.13.0
ARG RAY_VERSION=2.60.0
# Extras of the project to install: gpu adds xformers, s3 the S3 job store (s3fs) (build with EXTRAS= for neither).
ARG EXTRAS=gpu,s3
# A Hugging Face repo id to download into the image; empty: replicas download the weights when they start.
ARG PRELOAD_MODEL=
ARG PRELOAD_VARIANT=fp16

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/opt/hf-cache

# wget: the probes KubeRay adds by default call it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates wget \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first, pinned (PyPI's Linux wheel is the CUDA build): otherwise the project's dependencies pick one.
RUN pip install "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY serve_app ./serve_app
RUN pip install "torch==${TORCH_VERSION}" "ray[serve,data]==${RAY_VERSION}" ".${EXTRAS:+[$EXTRAS]}"
COPY serve_config.yaml ./
COPY configs ./configs

RUN if [ -n "$PRELOAD_MODEL" ]; then \
        python -c "from diffusers import DiffusionPipeline; DiffusionPipeline.download('$PRELOAD_MODEL', variant='$PRELOAD_VARIANT' or None)"; \
    fi

# Serve's HTTP port (serve_config.yaml) and Ray's Prometheus metrics port when started with --metrics-export-port=8080.
EXPOSE 8000 8080
CMD ["serve", "run", "serve_config.yaml"]
