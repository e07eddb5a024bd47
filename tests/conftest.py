"""Test beds shared by the whole suite: a real kube-apiserver and a real IPVS kernel in qemu."""

pytest_plugins = ["tests.apiserver.fixtures", "tests.vm.plugin"]
