"""Packaging beside pyproject.toml, for what its tables cannot say: the catalogue stays in models/
(the repository's layout) and ships inside the package as gpen/models/catalogue.json."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["gpen", "gpen.*"]), "gpen.models"], package_dir={"gpen.models": "models"},
      package_data={"gpen.models": ["catalogue.json"]})
