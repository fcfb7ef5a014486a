from __future__ import annotations

from buildgate.cli import main

if __name__ == "__main__":
    main()
