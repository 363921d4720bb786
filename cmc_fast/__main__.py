import sys

from cmc_fast.cli import main

sys.exit(main())
