"""The local launcher, with small real programs (no TensorFlow): fast and exact."""

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


def test_each_rank_gets_its_own_tf_config_and_output_prefix():
    code, out = launch(3, """
        import json, os
        c = json.loads(os.environ["TF_CONFIG"])
        print(c["task"]["index"], os.environ["TFPAR_RANK"], len(c["cluster"]["worker"]))
    """)
    assert code == 0
    for rank in range(3):
        assert f"[rank {rank}] {rank} {rank} 3" in out.splitlines()


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


def test_a_rank_killed_by_a_signal_is_reported_with_the_signal():
    code, out = launch(2, """
        import os, signal, time
        if os.environ["TFPAR_RANK"] == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(120)
    """)
    assert code == 128 + signal.SIGKILL
    assert "rank 1" in out and "killed by SIGKILL" in out


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


def test_restarts_are_bounded():
    code, out = launch(1, "import sys; sys.exit(4)", max_restarts=1)
    assert code == 4
    assert out.count("failed (exit code 4)") == 2


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


def test_launch_without_a_command_says_where_it_goes():
    result = tfpar_cli("launch", "--nproc", "2")
    assert result.returncode == 2
    assert "put it after '--'" in result.stdout


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


def test_info_describes_the_strategy_the_flags_would_build():
    result = tfpar_cli("info", "--num_simulated_devices=4")
    assert result.returncode == 0, result.stdout
    assert "strategy: data (4 replica(s), precision float32)" in result.stdout
    assert "cluster:  none (single process)" in result.stdout


def test_info_refuses_a_malformed_tf_config():
    result = tfpar_cli("info", env={"TF_CONFIG": '{"cluster": {"worker": ["a:1"]}}'})
    assert result.returncode != 0
    assert "no 'task' object" in result.stdout
