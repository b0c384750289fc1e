import sys

from slimtune.cli.main import main

sys.exit(main())
