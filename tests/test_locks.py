"""Cross-process locks: one per thing guarded, and a process that has to wait says so.

Two loraq processes on different models, data or GGUF files take different
locks and never wait for each other; on the same one, the second waits only
while the first fetches, converts or tokenizes it, and prints one line naming
what it waits for. ``flock`` locks belong to an open file, so a second open
in this process stands in for the other process.
"""
from __future__ import annotations

import fcntl
import threading
import time

from loraq.paths import file_lock


def test_a_lock_held_elsewhere_is_waited_for_and_said(tmp_path, capfd):
    path = tmp_path / ".model.lock"
    path.touch()
    order = []
    with open(path, "a+") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)  # "another process" fetching the model

        def second():
            with file_lock(path, waiting="fetching the model"):
                order.append("second has it")

        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.5)
        assert order == [] and thread.is_alive()
        order.append("first done")
        fcntl.flock(other.fileno(), fcntl.LOCK_UN)
    thread.join(10)
    assert order == ["first done", "second has it"]
    assert "loraq: waiting for another loraq process fetching the model" in capfd.readouterr().err


def test_different_things_do_not_wait_for_each_other(tmp_path, capfd):
    with file_lock(tmp_path / ".a.lock", waiting="converting a"), file_lock(tmp_path / ".b.lock", waiting="b"):
        pass
    assert "waiting" not in capfd.readouterr().err


def test_the_ranks_of_one_run_wait_for_each_other_quietly(tmp_path, capfd, monkeypatch):
    """Every rank prepares the same token store; the one that waits must not add a line to the run's one-line
    errors (tests/distributed)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = tmp_path / ".store.lock"
    path.touch()
    with open(path, "a+") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        def rank_one():
            with file_lock(path, waiting="tokenizing"):
                pass

        thread = threading.Thread(target=rank_one)
        thread.start()
        time.sleep(0.3)
        fcntl.flock(other.fileno(), fcntl.LOCK_UN)
    thread.join(10)
    assert "waiting" not in capfd.readouterr().err
