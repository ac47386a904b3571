"""Not a package: `server/` is the source folder of the import package `lorafleet_server`.

This file only turns an accidental `import server` (say, from the repository root, where Python would
otherwise make the folder an empty namespace package) into a clear error.
"""

raise ImportError("'server' is a source folder, not a package: import lorafleet_server (pip install .)")
