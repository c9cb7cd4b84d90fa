"""The package version (a leaf module, so code inside the package never imports the package root for it)."""

__version__ = "0.1.0"
