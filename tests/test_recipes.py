"""Every bundled recipe is a valid configuration, found by name or path, and flags override it."""
import argparse
from pathlib import Path

import pytest

from loraq.config import add_train_arguments, bundled_recipes, config_from_args

RECIPES = Path(__file__).resolve().parents[1] / "src" / "loraq" / "recipes"


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_the_common_cases_ship():
    assert {"demo", "qlora-chat", "lora-chat", "qlora-loftq", "full"} <= set(bundled_recipes())


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_recipe_validates_by_name_and_path(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "sft-demo").mkdir(parents=True)  # dpo-after-sft continues the SFT demo's run folder
    by_name = _parse([name])
    by_path = _parse([str(RECIPES / f"{name}.yaml")])
    assert by_name.to_dict() == by_path.to_dict()
    assert by_name.explicit  # the recipe set something


def test_flags_override_the_recipe():
    cfg = _parse(["qlora-chat", "--rank", "8", "--data", "x.jsonl"])
    assert cfg.rank == 8 and cfg.method == "qlora" and cfg.seq_len == 1024 and cfg.data == "x.jsonl"
