"""Not a package: `adapters/` is the source folder of the import package `lorafleet_adapters`.

This file only turns an accidental `import adapters` (say, from the repository root, where Python would
otherwise make the folder an empty namespace package) into a clear error.
"""

raise ImportError("'adapters' is a source folder, not a package: import lorafleet_adapters (pip install .)")
