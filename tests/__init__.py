"""The test suite (a package, so test modules are imported by their dotted path and may share basenames)."""
