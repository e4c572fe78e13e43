"""`python -m encoders list|bake ...`: the baked encoders (encoders.commands), as `hubembed encoders` runs them."""

import sys

from encoders.commands import main

if __name__ == "__main__":
    sys.exit(main())
