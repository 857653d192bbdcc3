"""``python -m lipsort.bench``: see :mod:`lipsort.bench`."""

import sys

from . import main

sys.exit(main())
