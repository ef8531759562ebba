"""Installs both packages: mmkernels (device layer) and mmassembler (host layer, in python/)."""

from setuptools import setup

setup(
    packages=["mmkernels", "mmkernels.kernels", "mmassembler", "mmassembler.engines", "mmassembler.testing"],
    package_dir={"mmkernels": "mmkernels", "mmassembler": "python/mmassembler",
                 "mmassembler.engines": "python/mmassembler/engines",
                 "mmassembler.testing": "python/mmassembler/testing"},
)
