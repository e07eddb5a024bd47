"""The ipvs-operator controller: allocates addresses, resolves backends, reports status."""

__version__ = "0.1.0"
