"""Read pip-audit's JSON report: fail on a known vulnerability that has a fixed release, report the rest.

pip-audit itself exits 1 on any finding, fixable or not, and (without --strict) passes quietly when
it could audit nothing. CI wants neither: a vulnerability with a fix available must stop the run, one
without a fix is printed for a person to weigh, and packages that could not be audited (no
vulnerability data reachable, a package not on PyPI) are counted out loud instead of read as clean.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(report_path: str) -> int:
    report = json.loads(Path(report_path).read_text())
    dependencies = report.get("dependencies", [])
    skipped = [d for d in dependencies if "skip_reason" in d]
    audited = [d for d in dependencies if "skip_reason" not in d]
    fixable, unfixed = [], []
    for dep in audited:
        for vuln in dep.get("vulns", []):
            row = f"{dep['name']} {dep['version']}: {vuln['id']} (fixed in: {', '.join(vuln['fix_versions']) or 'none'})"
            (fixable if vuln.get("fix_versions") else unfixed).append(row)
    print(f"pip-audit: {len(dependencies)} packages, {len(audited)} audited, {len(skipped)} could not be audited")
    for row in unfixed:
        print(f"  known vulnerability without a fixed release: {row}")
    for row in fixable:
        print(f"  KNOWN VULNERABILITY WITH A FIX: {row}")
    if dependencies and not audited:
        print(
            "  WARNING: no package could be audited (e.g. "
            f"{skipped[0]['skip_reason']}): PyPI's vulnerability data is not reachable from this machine; "
            "run `make audit` where it is"
        )
    return 1 if fixable else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
