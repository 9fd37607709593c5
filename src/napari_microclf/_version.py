"""The package's version, in a module of its own: the core records it in every bundle
without importing the package (whose ``__init__`` imports the core)."""

__version__ = "0.1.0"
