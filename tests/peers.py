"""The PyPI `rustbpe` (our API's origin), loaded side by side with ours for comparisons.

It installs a module of the same name, so it lives in its own folder:
    pip install --target ~/.cache/nanochat-peers/rustbpe rustbpe==0.1.0
"""

import glob
import importlib.util
import os

PEERS_DIR = os.environ.get("NANOCHAT_PEERS", os.path.join(os.path.expanduser("~"), ".cache", "nanochat-peers"))


def load_pypi_rustbpe():
    """The PyPI rustbpe extension module, or None if it is not installed in PEERS_DIR."""
    found = glob.glob(os.path.join(PEERS_DIR, "rustbpe", "rustbpe", "rustbpe*.so"))
    if not found:
        return None
    spec = importlib.util.spec_from_file_location("rustbpe", found[0])  # its init symbol is PyInit_rustbpe
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
