"""`python -m hostagent.collector COMMAND ...`: the same as `hostagent collector COMMAND ...`."""

import sys

from hostagent.collector.cli import main

sys.exit(main())
