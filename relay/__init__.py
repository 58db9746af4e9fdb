"""relay: a mail transfer agent with a compiled SMTP core.

Importing the package checks that the compiled extension modules (built from
``csrc/`` by ``setup.py``) are present, because the server, the outbound
client and the benchmark tools cannot run without them.
"""

import importlib

from relay._version import __version__

try:
    importlib.import_module("relay._buffer")
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "relay's compiled core (relay._buffer) is missing or cannot be loaded: "
        f"{exc}. Build it with `pip install .` from the source tree, or "
        "`python setup.py build_ext --inplace` for a development checkout "
        "(needs a C compiler, the Python headers and Cython 3)."
    ) from None

__all__ = ["__version__"]
