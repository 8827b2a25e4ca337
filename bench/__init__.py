"""ctwatch benchmarks: ``python bench/run.py`` (see bench/README.md). Not part of the installed package."""
