"""The local launcher, with small real programs (no TensorFlow): fast and exact.

Every test that starts a process is marked `multiprocess` (see conftest).
"""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import tfpar_cli
from tfpar import exit_codes
from tfpar.launch import Launcher, LaunchError


def program(source):
    return [sys.executable, "-c", textwrap.dedent(source)]


def launch(nproc, source, **kwargs):
    out = io.StringIO()
    code = Launcher(nproc=nproc, grace_period_s=kwargs.pop("grace", 2.0), out=out,
                    **kwargs).run(program(source))
    return code, out.getvalue()


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


@pytest.mark.multiprocess
def test_each_rank_gets_its_own_tf_config_and_output_prefix():
    code, out = launch(3, """
        import json, os
        c = json.loads(os.environ["TF_CONFIG"])
        print(c["task"]["index"], os.environ["TFPAR_RANK"], len(c["cluster"]["worker"]))
    """)
    assert code == 0
    for rank in range(3):
        assert f"[rank {rank}] {rank} {rank} 3" in out.splitlines()


@pytest.mark.multiprocess
def test_progress_lines_of_non_chief_ranks_are_dropped():
    code, out = launch(2, """
        print("Epoch 1/2"); print("4/4 ━━━━━━━━━━ 0s 3ms/step - loss: 0.5", end="\\r")
        print("8/8 - 1s - 30ms/step - loss: 0.4"); print("result line")
    """)
    assert code == 0
    lines = out.splitlines()
    assert "[rank 0] Epoch 1/2" in lines and "[rank 0] 8/8 - 1s - 30ms/step - loss: 0.4" in lines
    assert "[rank 1] result line" in lines
    assert not [l for l in lines if l.startswith("[rank 1]") and l != "[rank 1] result line"]


@pytest.mark.multiprocess
def test_a_failing_rank_stops_the_others_and_its_exit_code_and_last_lines_are_reported():
    start = time.monotonic()
    code, out = launch(3, """
        import os, sys, time
        if os.environ["TFPAR_RANK"] == "2":
            print("loading data"); print("ValueError: bad shape", flush=True); sys.exit(7)
        time.sleep(120)
    """)
    assert code == 7
    assert time.monotonic() - start < 20
    assert "rank 2" in out and "failed (exit code 7)" in out and "stopped the other 2 rank(s)" in out
    assert "    ValueError: bad shape" in out


@pytest.mark.multiprocess
def test_a_rank_killed_by_a_signal_is_reported_with_the_signal():
    code, out = launch(2, """
        import os, signal, time
        if os.environ["TFPAR_RANK"] == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(120)
    """)
    assert code == 128 + signal.SIGKILL
    assert "rank 1" in out and "killed by SIGKILL" in out


@pytest.mark.multiprocess
def test_no_process_is_left_behind_not_even_grandchildren(tmp_path):
    pids = tmp_path / "pids"
    code, _ = launch(2, f"""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        with open({str(pids)!r} + os.environ["TFPAR_RANK"], "w") as f:
            f.write(f"{{os.getpid()}} {{child.pid}}")
        if os.environ["TFPAR_RANK"] == "1":
            time.sleep(1); raise SystemExit(3)
        time.sleep(300)
    """)
    assert code == 3
    all_pids = [int(p) for r in range(2) for p in (tmp_path / f"pids{r}").read_text().split()]
    assert len(all_pids) == 4
    assert not [p for p in all_pids if alive(p)]


@pytest.mark.multiprocess
def test_a_rank_that_ignores_sigterm_is_killed_after_the_grace_period():
    start = time.monotonic()
    code, _ = launch(2, """
        import os, signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if os.environ["TFPAR_RANK"] == "1":
            time.sleep(0.5); sys.exit(1)
        time.sleep(300)
    """, grace=1.0)
    assert code == 1
    assert time.monotonic() - start < 15


@pytest.mark.multiprocess
def test_max_restarts_restarts_the_whole_group(tmp_path):
    marker = tmp_path / "failed-once"
    code, out = launch(2, f"""
        import os, sys
        print("attempt", os.environ["TFPAR_RESTART_COUNT"])
        if os.environ["TFPAR_RANK"] == "0" and not os.path.exists({str(marker)!r}):
            open({str(marker)!r}, "w").close(); sys.exit(5)
    """, max_restarts=2)
    assert code == 0
    assert "restarting all 2 ranks (restart 1 of 2)" in out
    assert "[rank 1] attempt 1" in out and "[rank 0] attempt 1" in out


@pytest.mark.multiprocess
def test_restarts_are_bounded():
    code, out = launch(1, "import sys; sys.exit(4)", max_restarts=1)
    assert code == 4
    assert out.count("failed (exit code 4)") == 2


# One line per start of a rank, so the runs can be counted.
COUNT_ATTEMPTS = """
    import os, signal, sys
    print("attempt", os.environ["TFPAR_RESTART_COUNT"], flush=True)
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("code", exit_codes.PERMANENT)
def test_a_permanent_exit_code_ends_the_launch_with_no_restart(code):
    code_seen, out = launch(2, COUNT_ATTEMPTS + f"""
    if os.environ["TFPAR_RANK"] == "1":
        sys.exit({code})
    import time; time.sleep(120)
    """, max_restarts=3)
    assert code_seen == code
    assert out.count("[rank 1] attempt") == 1
    assert "restarting" not in out
    assert (f"rank 1 exited with {code} ({exit_codes.describe(code)}): not restarted, "
            "exit codes 1 and 2 are permanent (tfpar.exit_codes)") in out


@pytest.mark.multiprocess
@pytest.mark.parametrize("failure, expected_code", [
    ("os.kill(os.getpid(), signal.SIGKILL)", 128 + signal.SIGKILL),
    (f"sys.exit({exit_codes.PEER_LOST})", exit_codes.PEER_LOST),
])
def test_a_signal_or_a_retryable_exit_restarts_the_group(failure, expected_code):
    code, out = launch(1, COUNT_ATTEMPTS + "    " + failure, max_restarts=1)
    assert code == expected_code
    assert out.count("[rank 0] attempt") == 2
    assert "restarting all 1 ranks (restart 1 of 1)" in out
    assert "all 1 restart(s) used; giving up" in out


@pytest.mark.multiprocess
def test_a_retryable_exit_that_keeps_failing_stops_after_max_restarts_with_the_last_code():
    # Preempted on the first two runs, a lost peer on the third and last.
    code, out = launch(1, COUNT_ATTEMPTS + f"""
    last = os.environ["TFPAR_RESTART_COUNT"] == "2"
    sys.exit({exit_codes.PEER_LOST} if last else {exit_codes.PREEMPTED})
    """, max_restarts=2)
    assert code == exit_codes.PEER_LOST
    assert [l for l in out.splitlines() if l.startswith("[rank 0] attempt")] == [
        "[rank 0] attempt 0", "[rank 0] attempt 1", "[rank 0] attempt 2"]
    assert out.count(f"failed ({exit_codes.describe(exit_codes.PREEMPTED)})") == 2
    assert out.count(f"failed ({exit_codes.describe(exit_codes.PEER_LOST)})") == 1


@pytest.mark.multiprocess
def test_a_rank_failing_with_1_because_its_peer_was_killed_does_not_stop_the_restart(tmp_path):
    # Rank 1 is killed; rank 0 notices at once and exits 1, as a worker whose
    # collective lost its peer does. Both are dead when the launcher looks.
    marker = tmp_path / "rank1-dies"
    code, out = launch(2, COUNT_ATTEMPTS + f"""
    import time
    if os.environ["TFPAR_RESTART_COUNT"] == "0":
        if os.environ["TFPAR_RANK"] == "1":
            open({str(marker)!r}, "w").close(); os.kill(os.getpid(), signal.SIGKILL)
        while not os.path.exists({str(marker)!r}):
            time.sleep(0.001)
        sys.exit(1)
    """, max_restarts=1)
    assert code == 0
    assert "rank 1 (pid" in out and "failed (killed by SIGKILL)" in out
    assert "restarting all 2 ranks (restart 1 of 1)" in out


@pytest.mark.multiprocess
def test_sigterm_to_the_launcher_stops_every_rank(tmp_path):
    pids = tmp_path / "pids"
    script = textwrap.dedent(f"""
        import os, time
        with open({str(pids)!r} + os.environ["TFPAR_RANK"], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(300)
    """)
    launcher = subprocess.Popen([sys.executable, "-m", "tfpar.cli.main", "launch", "--nproc", "2",
                                 "--grace_period", "2", "--", sys.executable, "-c", script],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"pids{r}").exists() for r in range(2)):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    launcher.send_signal(signal.SIGTERM)
    out, _ = launcher.communicate(timeout=30)
    assert launcher.returncode == 128 + signal.SIGTERM
    assert "got SIGTERM; stopping all ranks" in out
    ranks = [int((tmp_path / f"pids{r}").read_text()) for r in range(2)]
    assert not [p for p in ranks if alive(p)]


@pytest.mark.parametrize("kwargs, message", [
    ({"nproc": 0}, "--nproc=0: must be >= 1"),
    ({"nproc": 2, "max_restarts": -1}, "--max_restarts=-1: must be >= 0"),
    ({"nproc": 2, "grace_period_s": -1}, "--grace_period=-1: must be >= 0"),
])
def test_bad_launch_arguments_are_refused(kwargs, message):
    with pytest.raises(LaunchError, match=message):
        Launcher(**kwargs)


@pytest.mark.multiprocess
def test_launch_without_a_command_says_where_it_goes():
    result = tfpar_cli("launch", "--nproc", "2")
    assert result.returncode == 2
    assert "put it after '--'" in result.stdout


@pytest.mark.multiprocess
def test_info_json_reports_the_cluster_from_tf_config():
    config = {"cluster": {"worker": ["127.0.0.1:2001", "127.0.0.1:2002"]},
              "task": {"type": "worker", "index": 1}}
    result = tfpar_cli("info", "--json", env={"TF_CONFIG": json.dumps(config)})
    assert result.returncode == 0, result.stdout
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["cluster"]["tf_config"] == config
    assert report["cluster"]["rank"] == 1 and not report["cluster"]["is_chief"]
    assert report["strategy"]["name"] == "multi_worker"
    assert report["keras_backend"] == "tensorflow"


@pytest.mark.multiprocess
def test_info_describes_the_strategy_the_flags_would_build():
    result = tfpar_cli("info", "--num_simulated_devices=4")
    assert result.returncode == 0, result.stdout
    assert "strategy: data (4 replica(s), precision float32)" in result.stdout
    assert "cluster:  none (single process)" in result.stdout


@pytest.mark.multiprocess
def test_info_refuses_a_malformed_tf_config():
    result = tfpar_cli("info", env={"TF_CONFIG": '{"cluster": {"worker": ["a:1"]}}'})
    assert result.returncode != 0
    assert "no 'task' object" in result.stdout


@pytest.mark.parametrize("code, description", [
    (2, "a usage or configuration error"),
    (-signal.SIGKILL, "killed by SIGKILL"),             # subprocess.Popen's return code
    (128 + signal.SIGTERM, "killed by signal 15 (SIGTERM)"),  # a shell's exit status
    (7, "exit code 7"),
])
def test_exit_codes_are_described_by_the_contract_module(code, description):
    assert exit_codes.describe(code) == description
