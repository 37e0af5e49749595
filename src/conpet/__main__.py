import sys

from conpet.cli import main

sys.exit(main())
