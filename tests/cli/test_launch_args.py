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
