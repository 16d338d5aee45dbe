"""A missing or failed peer stops a benchmark, loudly, unless the run opted out of it.

A table of memopt's rows alone, with exit status 0, reads like a run that judged its targets
against the peer. So a script whose peer cannot run refuses to start (``peer_missing``), and one
whose peer configuration failed mid-run still prints what ran, then exits non-zero
(``exit_if_failed``). The explicit opt-out is the script's ``--no-<peer>`` flag; the output
then says that the peer was skipped (``skipped``). ckpt_stall_bench (``--no-fio``) and the
int8 benchmarks (bitsandbytes) behave the same way.
"""

from __future__ import annotations

from typing import NoReturn


def peer_missing(script: str, peer: str, why: object, install: str, flag: str) -> NoReturn:
    """Stop ``script`` (exit status 1): ``peer`` cannot run, ``why``; how to fix or opt out."""
    raise SystemExit(
        f"{script}: peer {peer} is unavailable: {why}\n"
        f"  install it: {install}\n"
        f"  or run without it: {flag} (the output then says that {peer} was skipped)"
    )


def skipped(peer: str, flag: str) -> str:
    """The line a run prints when ``flag`` left ``peer`` out."""
    return f"# {peer}: skipped ({flag}): nothing in this run is compared with it"


def exit_if_failed(script: str, failed: list[str]) -> None:
    """After the tables: exit non-zero when any configuration in ``failed`` did not run."""
    if failed:
        raise SystemExit(
            f"{script}: configuration(s) FAILED: {', '.join(failed)} (errors printed above; "
            f"the tables hold only the runs that completed)"
        )
