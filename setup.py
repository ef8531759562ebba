"""Installs both packages: mmkernels (device layer) and mmassembler (host layer, in python/)."""

from setuptools import setup

setup(
    packages=["mmkernels", "mmkernels.kernels", "mmassembler", "mmassembler.engines"],
    package_dir={"mmkernels": "mmkernels", "mmassembler": "python/mmassembler",
                 "mmassembler.engines": "python/mmassembler/engines"},
)
