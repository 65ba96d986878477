"""Shared fixtures for the planner tests: the catalog and the published calibration rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from exaflop.plan.catalog import CATALOG_DIR, Catalog, load_catalog

# The package ships shared/planner's 18 rows plus the ones grown since (more sources,
# optional columns); test_accuracy.py checks the two agree.

@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture(scope="session")
def calibration_path() -> Path:
    return CATALOG_DIR / "calibration.csv"
