"""`tfpar.cluster.process_group`: messages between processes, and how a lost peer is seen.

Every group here is real sockets on loopback; the ranks of one group run
in threads of the test process (the transport has no TensorFlow state), or
a rank is a bare socket that connects and then says nothing (a hung peer).
"""

import socket
import threading
import time

import numpy as np
import pytest

from tfpar.cluster.process_group import PeerLostError, ProcessGroup, ProcessGroupError
from tfpar.launch import free_ports


def addresses(n):
    return [f"127.0.0.1:{p}" for p in free_ports(n)]


def make_groups(n, **kwargs):
    where = addresses(n)
    groups, errors = {}, []

    def make(rank):
        try:
            groups[rank] = ProcessGroup(rank, where, connect_timeout_s=20, **kwargs)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=make, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return [groups[r] for r in range(n)]


def test_messages_keep_their_arrays_nones_scalars_and_order():
    g0, g1, g2 = make_groups(3)
    big = np.random.RandomState(0).randn(3, 1000, 257).astype("float32")
    g0.send(2, "act", [big, None, np.int32(7), np.arange(5, dtype="int64")], meta={"k": 1.5})
    g0.send(2, "act", [big[:1]])
    g1.send(2, "act", [np.ones(2, "float16")])
    arrays, meta = g2.recv(0, "act")
    assert np.array_equal(arrays[0], big) and arrays[0].dtype == np.float32
    assert arrays[1] is None
    assert arrays[2].shape == () and arrays[2] == 7 and arrays[2].dtype == np.int32
    assert arrays[3].tolist() == [0, 1, 2, 3, 4] and meta == {"k": 1.5}
    assert g2.recv(0, "act")[0][0].shape == (1, 1000, 257)  # the second message from rank 0
    assert g2.recv(1, "act")[0][0].dtype == np.float16  # tags are per sender
    for g in (g0, g1, g2):
        g.close()


def test_any_and_all_sum_agree_on_every_process():
    groups = make_groups(3)
    answers = {}

    def agree(g):
        answers[g.rank] = (g.any(g.rank == 1), g.any(False, tag="none"),
                           g.all_sum(0.25 * (g.rank + 1)))

    threads = [threading.Thread(target=agree, args=(g,)) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == {r: (True, False, 1.5) for r in range(3)}
    for g in groups:
        g.close()


def test_a_peer_that_closed_without_goodbye_is_lost_at_once():
    g0, g1 = make_groups(2, heartbeat_timeout_s=30)
    g1._sockets[0].close()  # as a killed process's kernel closes its sockets
    started = time.monotonic()
    with pytest.raises(PeerLostError, match=r"rank 0 waited for 'x' from rank 1 .* was lost"):
        g0.recv(1, "x")
    assert time.monotonic() - started < 5
    g0.close()


def test_a_peer_that_ended_is_named_as_ended():
    g0, g1 = make_groups(2)
    g1.send(0, "last", [np.zeros(1)])
    g1.close()
    assert g0.recv(1, "last")[0][0].shape == (1,)  # what it sent before its goodbye arrives
    with pytest.raises(PeerLostError, match="which ended"):
        g0.recv(1, "more")
    g0.close()


def test_a_silent_peer_is_lost_after_the_heartbeat_timeout():
    """Rank 1 connects, says who it is, and never speaks again (a stopped process)."""
    where = addresses(2)
    host, port = where[0].rsplit(":", 1)

    def hung_rank_1():
        for _ in range(100):
            try:
                conn = socket.create_connection((host, int(port)))
                break
            except OSError:
                time.sleep(0.05)
        conn.sendall((1).to_bytes(4, "big"))
        hung.append(conn)

    hung = []
    threading.Thread(target=hung_rank_1).start()
    g0 = ProcessGroup(0, where, heartbeat_timeout_s=1.5, heartbeat_interval_s=0.5,
                      connect_timeout_s=20)
    started = time.monotonic()
    with pytest.raises(PeerLostError, match=r"silent for 1\.\d s .*hung or cut off"):
        g0.recv(1, "grad")
    assert 1.5 <= time.monotonic() - started < 3.5
    hung[0].close()


def test_a_rank_that_never_comes_fails_start_up_naming_it():
    where = addresses(3)
    with pytest.raises(ProcessGroupError, match=r"rank 0: ranks \[1, 2\] .* did not connect "
                                                r"within 1 s"):
        ProcessGroup(0, where, connect_timeout_s=1)
    with pytest.raises(ProcessGroupError, match=r"rank 2 could not reach rank 0 at "):
        ProcessGroup(2, where, connect_timeout_s=1)


def test_bad_settings_are_refused_with_the_rule():
    where = addresses(2)
    with pytest.raises(ProcessGroupError, match="rank=2 is not one of the 2 processes"):
        ProcessGroup(2, where)
    with pytest.raises(ProcessGroupError, match=r"heartbeat_timeout_s=1 must exceed twice the "
                                                r"ping interval \(1.0 s\)"):
        ProcessGroup(0, where, heartbeat_timeout_s=1, heartbeat_interval_s=1.0)
    busy = socket.socket()
    busy.bind(("", int(where[0].rsplit(":", 1)[1])))
    busy.listen(1)
    try:
        with pytest.raises(ProcessGroupError, match=r"rank 0 cannot listen on port \d+ .*give "
                                                    "this task a free port"):
            ProcessGroup(0, where, connect_timeout_s=1)
    finally:
        busy.close()


@pytest.mark.multiprocess
def test_a_process_that_exits_right_after_sending_still_delivers_it():
    """A rank's last send (the gathered weights, say) is queued for its sender
    thread; a process that then returns from its program must deliver it, and
    end without resetting the connection, which would drop it."""
    import subprocess
    import sys

    where = addresses(2)
    sender = subprocess.Popen([sys.executable, "-c", (
        "import numpy as np\n"
        "from tfpar.cluster.process_group import ProcessGroup\n"
        f"g = ProcessGroup(1, {where!r}, connect_timeout_s=60)\n"
        "g.send(0, 'last', [np.arange(8 << 20, dtype='float32')])\n")])  # 32 MB, then exit
    try:
        g0 = ProcessGroup(0, where, connect_timeout_s=60)
        assert sender.wait(timeout=60) == 0
        time.sleep(0.5)  # read only after the sender is gone
        arrays, _ = g0.recv(1, "last")
        assert arrays[0].shape == (8 << 20,) and arrays[0][-1] == (8 << 20) - 1
        with pytest.raises(PeerLostError, match="which ended"):
            g0.recv(1, "more")
        g0.close()
    finally:
        if sender.poll() is None:
            sender.kill()
