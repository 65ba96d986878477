"""exaflop: the open software of an AI supercomputer."""

__version__ = "0.1.0"
