"""An ``AsyncCheckpointer`` inherited by a forked child (a DataLoader worker under the default
``fork`` start method, ``os.fork``, a ``multiprocessing`` fork child).

The child gets a copy of the checkpointer's Python objects but not its copier, writer and
protector threads, and its gloo group is the parent's connection: a save or wait made in the
child would wait for threads that do not exist there, and a ``close()`` there would destroy
the group the parent still uses (the child hung, then crashed). So the child refuses to use
it (``refuse``), its exit does not finish or close it (``exit_hook``), and its fence does
nothing: the child's tensors are its own copies, which the parent's save never reads.
"""

from __future__ import annotations

import os


def refuse(owner_pid: int, what: str, directory: str) -> None:
    """A RuntimeError when called in a process other than ``owner_pid``, the one that made
    the checkpointer (``what`` names the call, ``directory`` the checkpointer)."""
    pid = os.getpid()
    if pid != owner_pid:
        raise RuntimeError(
            f"{what}: this AsyncCheckpointer ({directory}) was made in process {owner_pid} and "
            f"inherited by fork into process {pid} (a DataLoader worker, os.fork, a "
            "multiprocessing child): its copier and writer threads and its process group "
            "belong to the parent, so it cannot save, wait, load or close here. Save from the "
            "parent process. To read a published snapshot in the child, open it with "
            "memopt.checkpoint.Snapshot('<directory>/step_...'); a child with no process group "
            "may also make its own AsyncCheckpointer"
        )
