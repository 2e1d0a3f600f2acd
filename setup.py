from setuptools import find_packages, setup

setup(
    name="metafast",
    version="0.1.0",
    description="Meta-learning for PyTorch on fused GPU kernels",
    packages=find_packages(include=["metafast", "metafast.*"]) + ["metafast.kernels"],
    package_dir={"metafast.kernels": "kernels"},
    python_requires=">=3.9",
    install_requires=["torch>=2.6", "numpy", "tqdm", "matplotlib"],
    entry_points={"console_scripts": ["metafast=metafast.cli:main"]},
)
