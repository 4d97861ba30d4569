#!/usr/bin/env bash
# Debian's chromium for the Playwright tests: Playwright's own browser download cannot work offline.
set -u
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium for the browser tests..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser tests will be skipped"
else
  echo "note: no chromium found and not root; install it (apt-get install chromium) to run the browser tests"
fi
exit 0
