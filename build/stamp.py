"""Write the build stamp module that `ociregistry version` reads."""

import datetime
import sys

stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
with open(sys.argv[1], "w", encoding="utf-8") as out:
    out.write(f'"""Build stamp written by build/stamp.py."""\n\nBUILD_DATE = "{stamp}"\n')
