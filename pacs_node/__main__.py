import sys

from pacs_node.cli import main

sys.exit(main())
