"""Shared fixtures for the planner tests: the catalog and the published calibration rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from exaflop.plan.catalog import CATALOG_DIR, Catalog, load_catalog

# CI checks out shared/ beside the repository; the package ships an identical copy.
SHARED_CALIBRATION = Path(__file__).parents[2].parent / "shared/planner/calibration.csv"
CALIBRATION = SHARED_CALIBRATION if SHARED_CALIBRATION.is_file() else CATALOG_DIR / "calibration.csv"


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture(scope="session")
def calibration_path() -> Path:
    return CALIBRATION
