"""kvferry's version, importable from anywhere in the tree without importing the package facade."""

__version__ = "0.1.0"
