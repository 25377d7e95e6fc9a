"""`ml-release stack stop` takes down everything a part started, not only the process it spawned."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from ml_release import stack
from tests.support.services import wait_until

pytestmark = pytest.mark.unit

# A leader that exits on SIGTERM, and a child of it that ignores SIGTERM: like `airflow standalone`
# going down while the scheduler it started hangs in its own shutdown. Both block until a signal.
LEADER = textwrap.dedent(
    """
    import signal, subprocess, sys
    subprocess.Popen([sys.executable, "-c",
        "import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "open(sys.argv[1], 'w').close(); signal.pause()", sys.argv[1]])
    signal.pause()
    """
)


def _stopped(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # dead, not yet reaped
    except psutil.NoSuchProcess:
        return True


# `stack start` spawns a part and exits, so the part's leader is reaped by init once it ends, as here.
START = (
    "import sys; from pathlib import Path; from ml_release import stack; "
    "home = Path(sys.argv[1]); settings = stack.StackSettings.from_env({'ML_RELEASE_HOME': str(home)}); "
    "print(stack._spawn(settings, 'part', sys.argv[2:], {}, home))"
)


def test_stop_kills_a_child_that_outlives_its_leader(tmp_path: Path) -> None:
    settings = stack.StackSettings.from_env({"ML_RELEASE_HOME": str(tmp_path)})
    ready = tmp_path / "child-ready"
    started = subprocess.run(
        [sys.executable, "-c", START, str(tmp_path), sys.executable, "-c", LEADER, str(ready)],
        capture_output=True,
        text=True,
        check=True,
    )
    leader = int(started.stdout)
    wait_until(ready.exists, timeout_s=30, what="the child to ignore SIGTERM")
    (child,) = psutil.Process(leader).children()

    assert stack._stop(settings, "part", timeout_s=2) is True

    assert _stopped(leader) and _stopped(child.pid)
    assert stack._group_members(leader) == []
    assert not (tmp_path / "run" / "part.pid").exists()
    assert stack._stop(settings, "part") is False  # nothing left to stop
