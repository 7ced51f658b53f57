"""Loaded by every Python process whose PYTHONPATH starts with this directory (the integration tests
set it for their torchrun jobs): with SNAPGUARD_CPU_SHIMS=1, installs the CPU-only framework shims
of ../framework_shims.py. Nothing else happens, so launchers and daemons start as usual."""

import os

if os.environ.get("SNAPGUARD_CPU_SHIMS") == "1":
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "snapguard_test_framework_shims", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                       "framework_shims.py"))
    _mod = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_mod)
    _mod.install_import_hooks(no_guard=os.environ.get("SNAPGUARD_TEST_NO_GUARD") == "1")
