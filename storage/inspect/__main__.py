import sys

from storage.inspect.cli import main

sys.exit(main())
