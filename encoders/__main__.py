"""`python -m encoders bake [--cache_dir DIR] [--only NAME ...]`: bake the pretrained encoders into the cache."""

import sys

from encoders.pretrained import main

if __name__ == "__main__":
    sys.exit(main())
