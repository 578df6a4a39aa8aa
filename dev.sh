#!/usr/bin/env bash
# spark_ddl's two commands. Each sets up .venv (Python >= 3.10) and needs Java >= 17.
#   bash dev.sh train [train.py options]   # train on data/digits.parquet with 2 agents
#   bash dev.sh test  [pytest options]     # the test suite
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"

need_java() {
  local version
  if ! command -v java >/dev/null 2>&1 && [ -z "${JAVA_HOME:-}" ]; then
    echo "spark_ddl needs Java 17 or newer for Spark: install it (e.g. 'apt-get install openjdk-17-jre-headless') and re-run." >&2
    exit 1
  fi
  version=$("${JAVA_HOME:+$JAVA_HOME/bin/}java" -version 2>&1 | sed -nE 's/.*version "([0-9]+)(\.([0-9]+))?.*/\1 \3/p' | head -n1)
  set -- $version
  local major="${1:-0}"
  [ "$major" = "1" ] && major="${2:-0}"
  if [ "$major" -lt 17 ]; then
    echo "spark_ddl needs Java 17 or newer for Spark, found Java $major: install Java 17+ (e.g. 'apt-get install openjdk-17-jre-headless') and re-run." >&2
    exit 1
  fi
}

need_python() {
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "spark_ddl needs Python 3.10 or newer: install it, or point PYTHON= at one, and re-run." >&2
    exit 1
  fi
}

setup_venv() {
  need_python
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  local stamp=.venv/.spark_ddl-installed want
  want=$(cat setup.py constraints.txt | sha256sum | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"
    echo "$want" > "$stamp"
  fi
  export PYSPARK_PYTHON="$PWD/.venv/bin/python" PYSPARK_DRIVER_PYTHON="$PWD/.venv/bin/python"
}

need_machines_tools() {
  # the separate-machine tests (network namespaces, tests/integration/test_machines.py) need iproute2;
  # as root, install it; otherwise those tests skip and say what is missing
  if ! command -v ip >/dev/null 2>&1 || ! command -v tc >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null) ||
        echo "could not install iproute2: the separate-machine tests will skip" >&2
    fi
  fi
}

cmd="${1:-}"; shift || true
case "$cmd" in
  train) need_java; setup_venv; exec .venv/bin/python jobs/train.py --overwrite "$@" ;;
  test)  need_java; need_machines_tools; setup_venv; exec .venv/bin/python -m pytest "$@" ;;
  *) echo "usage: bash dev.sh train|test [options]" >&2; exit 2 ;;
esac
