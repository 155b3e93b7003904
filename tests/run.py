"""Entry point of `make test`: runs pytest and treats "no tests collected" (exit 5) as a failure message.

pytest exits 5 when a selection matches nothing (e.g. `PYTEST_ARGS="-m gpu"` on a CPU machine); that is
not a broken build, so we report it plainly and exit 0 instead of failing CI with a cryptic code.
"""

import sys

import pytest

if __name__ == "__main__":
    code = pytest.main(sys.argv[1:])
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        print("tests.run: pytest collected no tests for this selection (exit 5); treating as success")
        code = 0
    sys.exit(int(code))
