# scanbridge BIDS App image.
#
#   docker build -t scanbridge .                                     # CPU torch from the PyTorch CPU index
#   docker build --build-arg TORCH_VARIANT=cu128 -t scanbridge:cuda .  # CUDA build of torch (GPU hosts)
#   docker build --build-arg FETCH_TEMPLATES=0 -t scanbridge .       # no TemplateFlow download at build time
#
# A CPU torch wheel placed in wheels/ is preferred over the index (CI uses this to build offline:
# pass --build-arg TORCH_INDEX_URL= as well). See docs/containers.md.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# --------------------------------------------------------------------------------------------
# python-env: a virtual environment with torch and the project. No compiler or pip cache is involved
# (the dependencies are wheels or pure Python), and the sources are bind-mounted, not copied, so the
# runtime stage builds on this one directly instead of copying gigabytes between stages.
FROM ${BASE_IMAGE} AS python-env

ARG TORCH_VERSION=2.13.0
# cpu, or a CUDA tag published by PyTorch for TORCH_VERSION (e.g. cu126, cu128)
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/scanbridge/bin:$PATH

RUN python -m venv /opt/scanbridge

# torch first, pinned with its local version label (+cpu / +cuXXX), so that no later requirement
# can pull a different build of PyTorch. (hadolint reads the optional index flag as an unpinned package.)
# hadolint ignore=DL3013
RUN --mount=type=bind,source=wheels,target=/tmp/wheels \
    pip install --find-links /tmp/wheels \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        "torch==${TORCH_VERSION}+${TORCH_VARIANT}" \
    && rm -rf /opt/scanbridge/lib/python3*/site-packages/torch/test

# The project, built from a scratch copy of the bind-mounted sources (setuptools writes into the
# source tree) that is removed in the same layer, as are the dependencies' own test suites (~300 MB;
# torch's C++ test binaries above).
RUN --mount=type=bind,target=/tmp/context \
    mkdir /tmp/src \
    && cp -r /tmp/context/pyproject.toml /tmp/context/README.md /tmp/context/bidsapp /tmp/context/workflows /tmp/src/ \
    && pip install /tmp/src \
    && rm -rf /tmp/src \
    && find /opt/scanbridge/lib/python3*/site-packages -mindepth 2 -type d -name tests -prune -exec rm -rf {} + \
    && python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v == '${TORCH_VERSION}+${TORCH_VARIANT}' else 'torch was replaced: ' + v)"

# --------------------------------------------------------------------------------------------
# templates: TemplateFlow files the participant workflow needs, fetched once at build time so that
# the container never needs the network. FETCH_TEMPLATES=0 keeps only TemplateFlow's offline
# skeleton (no image data); the app then falls back to its offline source (nilearn's ICBM152 2009a).
FROM python-env AS templates

ARG FETCH_TEMPLATES=1
ENV TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0

RUN python -c "import templateflow.api" \
    && if [ "$FETCH_TEMPLATES" = "1" ]; then \
        python -c "import sys, templateflow.api as tf; \
kinds = [dict(suffix='T1w', desc=None), dict(suffix='mask', desc='brain'), \
         dict(suffix='probseg', label='CSF'), dict(suffix='probseg', label='GM'), dict(suffix='probseg', label='WM')]; \
got = [tf.get('MNI152NLin2009cAsym', resolution=res, extension='.nii.gz', **k) for res in (1, 2) for k in kinds]; \
bad = [str(p) for p in got if not (p and not isinstance(p, list) and p.stat().st_size > 0)]; \
print('\n'.join(map(str, got))); \
sys.exit('TemplateFlow files missing or ambiguous: ' + ', '.join(bad) if bad else 0)"; \
    fi \
    && chmod -R a+rX /opt/templateflow

# --------------------------------------------------------------------------------------------
# runtime
FROM python-env AS runtime

# Unprivileged user; uid/gid 1000 so that `--user 1000:1000` and Kubernetes runAsNonRoot agree.
RUN groupadd --gid 1000 scanbridge \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin scanbridge

COPY --from=templates /opt/templateflow /opt/templateflow

# Everything that writes at run time is pointed at /tmp so that `--read-only --tmpfs /tmp` works:
# matplotlib's font cache, nipype's config/telemetry file (~/.nipype), XDG caches (torch hub ...).
ENV HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    XDG_DATA_HOME=/tmp/.local/share \
    MPLCONFIGDIR=/tmp/.config/matplotlib \
    NIPYPE_CONFIG_DIR=/tmp/.nipype \
    NIPYPE_NO_ET=1 \
    NO_ET=1 \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SCANBRIDGE_CONTAINER_TYPE=docker

ARG BASE_IMAGE
ARG VERSION=dev
ARG IMAGE_NAME=scanbridge
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG FETCH_TEMPLATES=1
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown

# Recorded by the app in dataset_description.json (GeneratedBy.Container).
ENV SCANBRIDGE_CONTAINER_IMAGE="${IMAGE_NAME}:${VERSION}"
LABEL org.opencontainers.image.title="scanbridge" \
      org.opencontainers.image.description="BIDS App for structural brain MRI that is robust to the scanner and protocol a scan came from" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      org.opencontainers.image.ref.name="${IMAGE_NAME}:${VERSION}" \
      org.scanbridge.torch="${TORCH_VERSION}+${TORCH_VARIANT}" \
      org.scanbridge.templates-fetched="${FETCH_TEMPLATES}"

USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["scanbridge"]
CMD ["--help"]
