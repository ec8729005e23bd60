import sys

from trainguard._cli import main

sys.exit(main())
