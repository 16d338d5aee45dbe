"""``memopt run`` argument parsing: overrides are optional, so a missing recipe is the only
thing the error names (argparse before 3.13 marks a ``*`` positional without a default
required)."""

from __future__ import annotations

import pytest

from memopt.cli import launch


@pytest.mark.parametrize("argv", [[], ["--dry-run"], ["--nproc-per-node", "2"]])
def test_missing_recipe_names_only_the_recipe(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit):
        launch.parser().parse_intermixed_args(argv)
    err = capsys.readouterr().err
    assert "required: recipe" in err and "overrides" not in err.split("error:")[1], err


def test_overrides_optional_and_intermixed() -> None:
    args = launch.parser().parse_intermixed_args(["r.yaml", "a.b=1", "--dry-run", "c.d=2"])
    assert (args.recipe, args.overrides, args.dry_run) == ("r.yaml", ["a.b=1", "c.d=2"], True)
    assert launch.parser().parse_intermixed_args(["r.yaml"]).overrides == []


def test_python_dash_m_memopt_is_the_command() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "memopt", "--help"], capture_output=True,
                         text=True, timeout=120, check=True).stdout  # fmt: skip
    assert "usage: memopt" in out and "estimate" in out and "run" in out
