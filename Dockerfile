# trisect on the official Ray image of the Ray version trisect pins (ray[serve]==2.60.0).
#   docker build -t trisect:0.1.0 .                                   # CPU (rayproject/ray:2.60.0-py311-cpu)
#   docker build --build-arg RAY_VARIANT=-gpu -t trisect:0.1.0-gpu .  # CUDA (rayproject/ray:2.60.0-py311-gpu)
# The Helm chart's default image is trisect:0.1.0 (helm/trisect/values.yaml: image).
ARG RAY_VARIANT=-cpu
FROM rayproject/ray:2.60.0-py311${RAY_VARIANT}

# The image's own non-root user (uid 1000) owns its Python; the chart runs pods as that user.
USER 1000:100
WORKDIR /home/ray/trisect

# The CPU image gets the CPU torch wheel first, so `pip install .` cannot pull a multi-GB CUDA build;
# the GPU image takes torch's default (CUDA) wheel through trisect's own requirement.
ARG RAY_VARIANT
ARG TORCH_VERSION=2.13.0
RUN if [ "$RAY_VARIANT" = "-cpu" ]; then \
      pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu; \
    fi

COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 cluster ./cluster
COPY --chown=1000:100 services ./services
COPY --chown=1000:100 encoders ./encoders
COPY --chown=1000:100 decoders ./decoders
# ray[serve]==2.60.0 is already in the image at that version, so pip keeps it.
RUN pip install --no-cache-dir . && python -c "import services.app, cluster.config"

ENV TRISECT_CACHE=/home/ray/.cache/trisect \
    PYTHONDONTWRITEBYTECODE=1
EXPOSE 8000 50051 8080
