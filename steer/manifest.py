"""The methods manifest: what ``steer.methods()`` returns, stored as JSON beside the package, so that
``steer methods`` lists the methods without importing torch (the command starts fast). A test checks that the
stored file equals the live registry; regenerate it after changing a method's name, description, families or
parameters::

    python -m steer.manifest        # writes steer/methods.json
"""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

PATH = Path(__file__).with_name("methods.json")


def live() -> list[dict[str, Any]]:
    """``steer.methods()`` as JSON data (imports the methods, and torch)."""
    from steer.api import methods

    return json.loads(json.dumps(methods(), default=str))


def load() -> list[dict[str, Any]]:
    """The methods as the manifest stores them; the live registry when third-party methods are installed (an
    entry point in the group ``steer.methods``) or the file is missing."""
    if PATH.is_file() and not list(entry_points(group="steer.methods")):
        return json.loads(PATH.read_text())
    return live()


def main() -> None:
    PATH.write_text(json.dumps(live(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {PATH}")


if __name__ == "__main__":
    main()


__all__ = ["PATH", "live", "load", "main"]
