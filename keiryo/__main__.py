import sys

from keiryo.cli import main

sys.exit(main())
