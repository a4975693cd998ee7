# The image of every pod in k8s/ (RayJob head, workers and submitter; evaluation CronJob; RayCronJob),
# named `vsrn-dist` there and set per overlay with kustomize `images:` (README "Container image"):
#
#   docker build -t REGISTRY/vsrn-dist:TAG .
#   docker build -t REGISTRY/vsrn-dist:TAG --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#
# tests/test_dockerfile.py parses this file: the base image's Ray version must equal `rayVersion` of
# the manifests and the image of cluster/gpu-cluster.yaml, USER and WORKDIR the manifests'
# runAsUser/workingDir, every COPY source must exist and pass .dockerignore, and the default torch
# must satisfy setup.py.

# Ray's own image, so that Ray itself, its Python (3.11, conda in /home/ray/anaconda3) and the `ray`
# user match what KubeRay expects. The tag must be the manifests' `rayVersion` (KubeRay and the Ray
# processes of the cluster must run one Ray version); the -gpu variant brings CUDA for the GPU pods
# and runs unchanged on the CPU-only head and the dev overlay's CPU pods.
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-gpu

# Declared again: an ARG before FROM is only visible in FROM lines.
ARG RAY_VERSION
# The torch build. Installed on its own, before the project, so that pip keeps it when it resolves
# setup.py's `torch>=2.11,<2.14` (an installed torch that satisfies the range is never replaced) and
# so that this multi-gigabyte layer is rebuilt only when these arguments change. The CUDA wheels
# bring their own CUDA runtime (nvidia-* packages): pick the index of a CUDA version the nodes'
# driver supports (cu126, cu128, ...), or https://download.pytorch.org/whl/cpu for a small CPU-only
# image (dev overlay). An empty TORCH_INDEX_URL installs torch from PyPI.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

# Logs reach `kubectl logs` / `ray job logs` as they are written; pip keeps no wheel cache in the
# layers (the CUDA torch wheels alone are gigabytes) and does not look for a newer pip.
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# The project directory, owned by the runtime user: `pip install -e` writes vsrn_dist.egg-info into
# it during the build. The rayproject/ray images run as `ray` (UID 1000, group `users`, GID 100);
# root only for this mkdir.
USER root
RUN install -d -o 1000 -g 100 /app
# Numeric, so that the kubelet can check `runAsNonRoot` even where a pod sets no runAsUser; the
# manifests run every container as 1000:100 (runAsUser/runAsGroup), the same user.
USER 1000:100
WORKDIR /app

# Layer 1: torch (see the ARGs above). The version file lets the project layer check that pip
# left it alone.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} $TORCH_SPEC \
    && python -c "import torch; print(torch.__version__)" > /tmp/torch-version

# Layer 2: the project's dependencies, which change far less often than the code. Only setup.py is
# copied; empty stand-ins of its packages let `pip install -e` run, and the real packages copied
# below replace them (an editable install imports them from /app, so no reinstall is needed).
# Ray is pinned to the base image's own version so that no dependency can move it off `rayVersion`.
# Editable rather than a normal install: there is one copy of the code, the one in /app, which
# `python trainer/evaluate.py` (CronJob) imports, which the RayJob uploads as its working_dir, and
# which cluster/gpu-cluster.yaml installs the same way (`pip install -e`).
COPY --chown=1000:100 setup.py /app/
RUN for package in model trainer trainer.evaluation trainer.evaluator trainer.inference trainer.reporting \
        trainer.run trainer.training data_shards monitoring cluster; do \
        directory="$(echo "$package" | tr . /)" && mkdir -p "$directory" && touch "$directory/__init__.py"; \
    done \
    && pip install -e . "ray[default,train]==${RAY_VERSION}" \
    && python -c "import pathlib, ray, torch; \
assert torch.__version__ == pathlib.Path('/tmp/torch-version').read_text().strip(), 'pip replaced torch'; \
assert ray.__version__ == '${RAY_VERSION}', 'pip replaced ray'" \
    && rm /tmp/torch-version

# Layer 3: the code and configurations, what the entrypoints need: `python trainer/launch.py
# --config configs/...` (RayJob) and `python trainer/evaluate.py` (CronJob, RayCronJob) run from
# /app (the manifests' workingDir and working_dir). Tests, benchmarks, docs and k8s/ stay out of the
# image, and therefore out of the working_dir every job uploads.
COPY --chown=1000:100 model/ /app/model/
COPY --chown=1000:100 data_shards/ /app/data_shards/
COPY --chown=1000:100 monitoring/ /app/monitoring/
COPY --chown=1000:100 cluster/ /app/cluster/
COPY --chown=1000:100 trainer/ /app/trainer/
COPY --chown=1000:100 configs/ /app/configs/

# No ENTRYPOINT or CMD of our own: KubeRay sets the Ray containers' command (`ray start ...`), the
# submitter's (`ray job submit ...`) and the CronJob its `python trainer/evaluate.py`.
