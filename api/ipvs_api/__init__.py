"""The ipvs.io/v1alpha1 API shared by the operator and the node agent.

One package models the contract once: the CRD schemas in ``crds/`` (shipped inside this package
as ``ipvs_api.crds``), Python mirrors of their CEL rules, and typed views of the objects. It
imports neither kopf nor pyroute2, so both programs can depend on it.
"""

from ipvs_api.errors import FieldError, InvalidObject

__all__ = ["FieldError", "InvalidObject"]
