"""The base of every config section (torch-free, imports nothing of exaflop).

Its own module so that task config sections (`lm/config.py`, `drive/config.py`) and the
shared config (`config.py`) both build on it without importing each other.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
