"""`python -m adaptermix ...`: the same as the `adaptermix` command."""

import sys

from adaptermix.cli import main

sys.exit(main())
