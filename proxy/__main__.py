"""``python -m proxy``: the ``proxy`` command line (proxy/cli.py)."""

from __future__ import annotations

from proxy.cli import main

if __name__ == "__main__":
    main()
