import sys

from puma_ray.cli import main

sys.exit(main())
