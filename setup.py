"""fastguide build: pure-Python package plus the optional compiled extension ``fastguide._C``."""

from setuptools import setup

setup(
    name="fastguide",
    version="0.1.0",
    description="Fused, sync-free guided diffusion sampling for PyTorch",
    python_requires=">=3.9",
    packages=["fastguide", "fastguide.kernels"],
    package_dir={"fastguide": "fastguide", "fastguide.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "hypothesis", "diffusers>=0.30", "scikit-learn", "safetensors", "triton", "tqdm"],
    },
)
