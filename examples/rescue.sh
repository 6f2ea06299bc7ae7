#!/usr/bin/env bash
# A rescue script that drives contexta.pyz as a command: one JSON object on stdout, meaningful exit codes.
#
#   examples/rescue.sh PATH/TO/contexta.pyz WORKSPACE BACKUP_ROOT
#
# Proves the newest backup restorable and prints what it found; exits with the tool's own code
# (0 restorable, 1 problems found, 3 could not run, 4 locked).
set -uo pipefail
pyz=$1 workspace=$2 backup_root=$3

result=$(python3 "$pyz" --workspace "$workspace" --backup-root "$backup_root" restore --verify-only --json)
code=$?
case $code in
  0) verdict="restorable" ;;
  1) verdict="NOT restorable: problems found" ;;
  3) verdict="could not run" ;;
  4) verdict="locked by another run" ;;
  *) verdict="unexpected exit $code" ;;
esac
summary=$(printf '%s' "$result" | python3 -c '
import json, sys
result = json.load(sys.stdin)
if result["status"] == "ERROR":
    print(result["error"]["code"], result["error"]["message"])
else:
    print(result["backup_ref"], result["plane_results"]["records"]["record_count"], "records",
          len(result["problems"]), "problems")')
echo "$verdict: $summary"
exit $code
