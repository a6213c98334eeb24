"""python -m searchspace.report"""
import sys

from searchspace.report import main

sys.exit(main())
