#!/usr/bin/python3
"""Print a debian/changelog entry for the version being built (the changelog is generated, not kept)."""

import email.utils
import os
import sys

version = sys.argv[1]
when = email.utils.formatdate(int(os.environ.get("SOURCE_DATE_EPOCH", "0")) or None, localtime=False)
print(f"""unbounded-agent-ops ({version}) unstable; urgency=medium

  * Release {version}.

 -- unbounded-agent ops developers <unbounded-agent-ops@lists.unbounded-cloud.io>  {when}""")
