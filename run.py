"""ctwatch entry point: ``python run.py [command] [--config F]``. See README.md."""

import sys

from processor.cli import main

if __name__ == "__main__":
    sys.exit(main())
