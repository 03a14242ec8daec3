"""Put on PYTHONPATH by ``provhpc run`` for the Python processes started below it.

Before such a process runs its program, say on stderr when it cannot import provhpc (an
interpreter of another environment): its records would silently be missing.  Standard
library only, and no import of provhpc itself (that stays lazy and costs nothing here).
Then run the sitecustomize that this one shadows, if there is one.
"""

import importlib.machinery
import importlib.util
import os
import sys

__all__: list = []


def _main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    if os.environ.get("PROVHPC_ATTACH") and importlib.util.find_spec("provhpc") is None:
        sys.stderr.write(
            f"provhpc: {sys.executable} (pid {os.getpid()}) cannot import provhpc: what this "
            "process records is not captured (the run's own record is kept); install provhpc "
            "in this environment\n")
        sys.stderr.flush()
    path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        sys.modules["sitecustomize"] = module
        spec.loader.exec_module(module)


_main()
