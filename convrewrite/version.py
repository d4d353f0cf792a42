"""The package version (a module of its own, so modules inside the package can read it without importing
the package itself)."""

__version__ = "0.1.0"
