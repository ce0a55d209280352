import sys

from flaxsst.serve.server import console_main

sys.exit(console_main())
