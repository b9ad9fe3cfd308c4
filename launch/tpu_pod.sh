#!/usr/bin/env bash
# Thin wrapper: launch/tpu_pod.sh {create,setup,run,logs,stop,delete} --name ... --zone ... [--dry-run]
exec python3 "$(dirname "$0")/tpu_pod.py" "$@"
