import pytest

from exaflop.drive.importers.clips import ImportOptions


@pytest.fixture
def opts():
    """Small, fast clips; inline conversion (workers=0) unless a test wants the pool."""
    return ImportOptions(frames=4, fps=10.0, width=32, height=32, stride=4, waypoints=4, dt=0.5,
                         workers=0, val_fraction=0.5)
