"""The README's table of faults tried is the one the tests' fault markers give."""

import subprocess
import sys

from tests.support import ROOT
from tools import faults_table


def test_readme_faults_table_is_generated_from_the_tests():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "faults_table.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr

    rows = faults_table.faults()
    assert len(rows) >= 20
    for _, _, test in rows:   # every row names a test that exists
        path, name = test.split("::")
        assert f"def {name}(" in (ROOT / path).read_text()
