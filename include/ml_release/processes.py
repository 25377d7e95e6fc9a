"""Stopping the local servers we start (TorchServe, HAProxy): the parent and every child."""

from __future__ import annotations

from typing import Any


def terminate_tree(proc: Any, timeout_s: float, children_timeout_s: float = 10) -> None:
    """SIGTERM ``proc`` (a ``psutil.Process``), SIGKILL it after ``timeout_s``, then its children.

    The children are collected before the parent is signalled, so that no worker survives a
    parent that had to be killed. A process that is already gone is not an error.
    """
    import psutil

    try:
        children = proc.children(recursive=True)
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=children_timeout_s)
        _, alive = psutil.wait_procs(children, timeout=children_timeout_s)
        for child in alive:
            child.kill()
    except psutil.NoSuchProcess:
        pass
