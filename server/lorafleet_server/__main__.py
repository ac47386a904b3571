import sys

from lorafleet_server.cli import main

sys.exit(main())
