"""Loaded by every Python process whose PYTHONPATH starts with this directory (the integration tests
set it for their torchrun jobs): with SNAPGUARD_CPU_SHIMS=1, installs the CPU-only framework shims
of ../framework_shims.py; with SNAPGUARD_TEST_NO_GUARD=1, makes the integrations' protect() a no-op.
Nothing else happens, so launchers and daemons start as usual."""

import os

if "1" in (os.environ.get("SNAPGUARD_CPU_SHIMS"), os.environ.get("SNAPGUARD_TEST_NO_GUARD")):
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "snapguard_test_framework_shims", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                       "framework_shims.py"))
    _mod = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_mod)
    _mod.install_import_hooks(cpu_shims=os.environ.get("SNAPGUARD_CPU_SHIMS") == "1",
                              no_guard=os.environ.get("SNAPGUARD_TEST_NO_GUARD") == "1")
