import sys

from ptqkit.cli import main

sys.exit(main())
