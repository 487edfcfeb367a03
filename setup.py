"""Packages of the wheel: everything under memvp_ds, data_prep and memvp_demo, plus the DeepSpeed JSON.

The ZeRO settings live once, at the top of the repository (``ds_configs/``, as the design card lays out);
the wheel carries them inside the package, as ``memvp_ds/recipes/ds_configs/``, so that
``train.ds_config=zero3`` resolves in an installed copy too (memvp_ds/recipes/__init__.py looks in both).
The rest of the metadata is in pyproject.toml.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=find_namespace_packages(include=["memvp_ds*", "data_prep*", "memvp_demo*"]) + ["memvp_ds.recipes.ds_configs"],
    package_dir={"memvp_ds.recipes.ds_configs": "ds_configs"},
)
