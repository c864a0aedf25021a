import sys

from llmshrink.cli import main

sys.exit(main())
