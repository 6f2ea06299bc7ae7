"""The closing lines of tests/run_all.sh, from the JUnit XML each pytest run wrote.

Usage: python3 tests/run_summary.py .build/logs/junit-3.8.xml ...  (one file per interpreter, named
junit-<X.Y>.xml).  Prints two lines: every skip with its reason and the interpreters it happened
on - never nothing, since a skipped test proves nothing - and the totals over all interpreters.
"""

import re
import sys
import xml.etree.ElementTree as ElementTree
from collections import OrderedDict


def _version(path):
    match = re.search(r"junit-(\d+\.\d+)\.xml$", path)
    return match.group(1) if match else path


def _version_key(version):
    return tuple(int(part) if part.isdigit() else 0 for part in version.split("."))


def read_runs(paths):
    """{version: (counts, {skip reason: count})} for each readable file."""
    runs = {}
    for path in paths:
        try:
            root = ElementTree.parse(path).getroot()
        except (OSError, ElementTree.ParseError):
            continue
        counts = {"passed": 0, "failed": 0, "skipped": 0}
        reasons = OrderedDict()
        for case in root.iter("testcase"):
            skipped = case.find("skipped")
            if skipped is not None:
                counts["skipped"] += 1
                reason = skipped.get("message") or "no reason given"
                reasons[reason] = reasons.get(reason, 0) + 1
            elif case.find("failure") is not None or case.find("error") is not None:
                counts["failed"] += 1
            else:
                counts["passed"] += 1
        runs[_version(path)] = (counts, reasons)
    return runs


def skip_line(runs):
    """'skipped: none', or each reason with how many tests it skipped on which interpreters."""
    if not runs:
        return "skipped: unknown - no pytest run left a JUnit report"
    grouped = OrderedDict()  # (reason, count) -> versions
    for version in sorted(runs, key=_version_key):
        for reason, count in runs[version][1].items():
            grouped.setdefault((reason, count), []).append(version)
    if not grouped:
        return "skipped: none"
    parts = []
    for (reason, count), versions in grouped.items():
        where = "%d skipped on %s" % (count, ", ".join(versions))
        category, separator, detail = reason.partition(": ")
        if separator and " " not in category:  # "interop: no network to PyPI"
            parts.append("%s: %s: %s" % (category, where, detail))
        else:
            parts.append("%s: %s" % (where, reason))
    return "skipped: " + "; ".join(parts)


def total_line(runs):
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    for counts, _ in runs.values():
        for key in totals:
            totals[key] += counts[key]
    return "total: %(passed)d passed, %(failed)d failed, %(skipped)d skipped" % totals


def main(paths):
    runs = read_runs(paths)
    print(skip_line(runs))
    print(total_line(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
