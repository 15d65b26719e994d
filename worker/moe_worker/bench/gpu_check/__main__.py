import sys

from moe_worker.bench.gpu_check.check import main

sys.exit(main())
