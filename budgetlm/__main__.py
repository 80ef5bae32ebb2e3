import sys

from budgetlm.cli import main

sys.exit(main())
