import sys

from qlora_ray.cli import main

sys.exit(main())
