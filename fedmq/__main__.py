import sys

from fedmq.cli import main

sys.exit(main())
