"""The version, apart, so modules of the package can read it while the package imports."""

__version__ = "0.1.0"
