"""Noisy-label mixing at scale: MixNN and SelectMix on one Accelerate/WebDataset/FAISS pipeline."""
from setuptools import setup

setup(
    name="noisymix",
    version="0.1.0",
    description="Learning with noisy labels at scale: MixNN and SelectMix with Accelerate, WebDataset and FAISS",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["data", "index", "train"],
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
