"""starlight_core: the pure core of starlight (formats, models, algorithms).

Importing this package pulls in no I/O library: the registry client lives in
``starlight_core.registry`` and is imported only by those who need it.
"""

from starlight_core.errors import StarlightError

__version__ = "0.1.0"

__all__ = ["StarlightError", "__version__"]
