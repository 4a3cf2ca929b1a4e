"""Packaging for hybrimoe-kt. The top-level ``kernels/`` folder ships as ``hybrimoe_kt.kernels``."""

from setuptools import find_packages, setup

packages = find_packages(include=["hybrimoe_kt", "hybrimoe_kt.*"])
packages += ["hybrimoe_kt.kernels"] + [
    "hybrimoe_kt.kernels." + p for p in find_packages(where="kernels")
]

setup(
    name="hybrimoe-kt",
    version="0.1.0",
    description="HybriMoE hybrid CPU-GPU MoE inference as a kTransformers plugin, with a trace-driven simulator",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"hybrimoe_kt.kernels": "kernels"},
    package_data={"hybrimoe_kt.core": ["profiles/*.json"]},
    install_requires=[
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        # torch is a range that the CPU build 2.13.0 satisfies: install torch==2.13.0 first on CPU machines.
        "torch": ["torch>=2.4,<2.15", "transformers>=4.48", "safetensors>=0.4", "gguf>=0.10"],
        # the OpenAI-compatible server (hybrimoe-kt serve)
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "pydantic>=2.5", "prometheus-client>=0.19"],
        # triton runs the GPU expert kernels on CPU tensors in interpreter mode (TRITON_INTERPRET=1)
        "test": ["pytest>=8", "hypothesis>=6.100", "openai>=1.30", "triton>=3.2; platform_system == 'Linux'"],
    },
    entry_points={"console_scripts": ["hybrimoe-kt=hybrimoe_kt.cli:main"]},
)
