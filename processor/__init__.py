"""ctwatch: see README.md. Importing the package installs one import finder: pydicom without its
test-file download libraries (:mod:`processor.lean`)."""

from processor import lean

lean.install()
