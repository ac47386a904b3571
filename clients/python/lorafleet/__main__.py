"""``python -m lorafleet``: the lorafleet-client command."""

import sys

from lorafleet.cli import main

sys.exit(main())
