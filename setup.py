"""Installs both packages: mmkernels (device layer) and mmassembler (host layer, in python/)."""

from setuptools import setup

setup(
    packages=["mmkernels", "mmkernels.kernels", "mmassembler"],
    package_dir={"mmkernels": "mmkernels", "mmassembler": "python/mmassembler"},
)
