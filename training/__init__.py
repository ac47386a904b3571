"""Not a package: `training/` is the source folder of the import package `lorafleet_training`.

This file only turns an accidental `import training` (say, from the repository root, where Python would
otherwise make the folder an empty namespace package) into a clear error.
"""

raise ImportError("'training' is a source folder, not a package: import lorafleet_training (pip install .)")
