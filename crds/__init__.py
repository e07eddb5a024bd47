"""The CRD manifests, shipped as package data of ipvs_api so the schema exists once.

`kubectl apply -f crds/` reads only the YAML files here; Python reads them through
`importlib.resources.files("ipvs_api.crds")`.
"""
