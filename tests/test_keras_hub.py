"""keras-hub causal LMs under tfpar's strategies: the table of tests/keras_hub_table.py.

Each column of the table (tensor parallel; data parallel and pipeline) runs
as `pytest tests/keras_hub_table.py -k ...` in a fresh process, so that the
in-process part of the suite stays fast and each column has its own
TensorFlow (a 4-device mesh cannot follow a smaller one in one process).
A failing row is named in the output shown.
"""

import re
import sys

import pytest

from conftest import run
from keras_hub_table import COLUMNS

pytestmark = [pytest.mark.hub, pytest.mark.multiprocess]

# Rows per column: the Megatron preset's split of 5 families; TensorParallel and the
# pipeline train 4 (not Mistral: Llama's weights), DataParallel 2; the backbones'
# own layout maps (3), the gather-on-read check, and sharded: Llama FSDP x TP with
# its own layout map, Llama ZeRO-3 on 4 devices.
ROWS = {"tensor": 5 + 4 + 3 + 1 + 1 + 1, "data_and_pipeline": 2 + 4}


@pytest.mark.parametrize("column", sorted(COLUMNS))
def test_keras_hub_models_match_the_exact_one_device_run(column):
    result = run([sys.executable, "-m", "pytest", "tests/keras_hub_table.py", "-q", "-s",
                  "-p", "no:cacheprovider", "-o", "addopts=", "-k", COLUMNS[column]],
                 timeout=540)
    assert result.returncode == 0, result.stdout[-6000:]
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) == ROWS[column], result.stdout[-3000:]
    print("\n".join(line for line in result.stdout.splitlines() if "max |dw|" in line))
