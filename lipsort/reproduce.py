"""``python -m lipsort.reproduce``: execute the book's chapters (see :mod:`lipsort.book.runner`)."""

import sys

from .book.runner import main

if __name__ == "__main__":
    sys.exit(main())
