"""Packaging entry point. Metadata lives in pyproject.toml; this file only adds the
optional compiled backend from csrc/ (see fedhello/kernels/extension.py)."""

from setuptools import setup

setup()
