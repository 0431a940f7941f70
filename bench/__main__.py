import sys

from fanline.bench.run import main

sys.exit(main())
