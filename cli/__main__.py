import sys

from fanline.cli.main import main

sys.exit(main())
