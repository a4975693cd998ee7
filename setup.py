"""Packaging for the VSRN distributed training system.

The version ranges accept the CPU wheel of torch 2.13.0 that the development machines install
first, so pip never replaces it with a multi-gigabyte CUDA build. torch's range is the one that
was run: 2.11 (the GPU host's; Python 3.12 and 3.10), 2.12 and 2.13 (tests/model, the two-worker
gathered loss through Ray and DeepSpeed, the main job; 2026-12-04). Below 2.11 nothing was run,
and below 2.5 the code cannot work (fused Adam on CPU and torch.is_autocast_enabled("cpu") need
2.4, torch.serialization.safe_globals 2.5).
"""
from setuptools import setup

setup(
    name="vsrn-dist",
    version="0.1.0",
    description="Distributed, large-scale training and evaluation of VSRN (ICCV 2019) image-text matching",
    python_requires=">=3.10",
    # Every package, subpackages included (tests/test_dockerfile.py checks that none is missing):
    # a wheel holds only those listed.
    packages=["model", "trainer", "trainer.evaluation", "trainer.evaluator", "trainer.inference",
              "trainer.reporting", "trainer.run", "trainer.training", "data_shards", "monitoring", "cluster"],
    install_requires=[
        "torch>=2.11,<2.14",
        "numpy>=1.24",
        # 0.19: FlatAdam saves the layout of its ZeRO-0 optimizers and the ZeRO 1-2 step is freed of
        # its norm sync through two of its module globals (trainer/training/engine.py, optimizer.py)
        "deepspeed>=0.19,<0.20",
        "webdataset>=0.2.86",
        "ray[default,train]>=2.40",
        "s3fs>=2024.2",
        "prometheus-client>=0.20",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "nltk>=3.8",
        "matplotlib>=3.7",  # trainer/report.py: PNG plots of a run
        # data_shards/coco_annotations.py: the COCO 5K test ids and the ECCV Caption / CxC ground truths
        # of the eccv and cxc protocols (MIT); pinned: the protocols' numbers depend on its data files
        "eccv-caption==0.1.0",
        "Pillow>=10.1",  # data_shards/synthetic.py draws the synthetic images (matplotlib needs it anyway)
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            # a local S3 server for the tests, as s3fs's own suite uses; botocore capped because
            # aiobotocore (s3fs) pins it and an unpinned moto pulls a newer one
            "moto[server]>=5.2.5",
            "botocore<1.43.118",
            "boto3",
            # manifest validation: built-in kinds with kubernetes-validate, KubeRay kinds with jsonschema
            "kubernetes-validate>=1.28",
            "jsonschema>=4.18",
        ],
    },
)
