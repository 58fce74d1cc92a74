"""Noisy-label mixing at scale: MixNN and SelectMix on one Accelerate/WebDataset/FAISS pipeline."""
import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', Path(__file__).with_name("train").joinpath("version.py").read_text())[1]

setup(
    name="noisymix",
    version=VERSION,
    description="Learning with noisy labels at scale: MixNN and SelectMix with Accelerate, WebDataset and FAISS",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["data", "data.*", "index", "index.*", "train", "train.*"]),
    entry_points={"console_scripts": [
        "noisymix-prepare = data.prepare:main",
        "noisymix-train = train.main:cli",  # one process; `accelerate launch -m train.main` for several
        "noisymix-evaluate = train.evaluate:main",
        "noisymix-report = train.report:main",
    ]},
    install_requires=[
        "torch",
        "torchvision",
        "timm",
        "accelerate",
        "webdataset",
        "wids",
        "faiss-cpu",
        "scikit-learn",
        "scipy",
        "tensorboard",
        "tqdm",
        "pyyaml",
        "pillow",
        "safetensors",  # --pretrained FILE.safetensors
        "numpy",
        "cleanlab",  # confident-learning method, selectmix_rule cleanlab
        "matplotlib",  # figures in TensorBoard and the label report
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout"],
    },
)
