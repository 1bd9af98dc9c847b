"""Every entry point takes its sampling defaults from hairdiff_core.defaults (one place)."""

from __future__ import annotations

import inspect

import hairdiff_cli
from hairdiff_core.defaults import DEFAULTS
from hairdiff_core.evaluation.evaluate import EvalOptions
from hairdiff_core.pipeline import HairDiffPipeline


def _subparser(name):
    parser = hairdiff_cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[name]


def test_pipeline_eval_and_cli_share_the_defaults():
    sig = inspect.signature(HairDiffPipeline.generate).parameters
    opts = EvalOptions()
    for name in ("steps", "seed", "cfg", "shift", "strength"):
        assert sig[name].default == getattr(DEFAULTS, name) == getattr(opts, name), name
    assert sig["context_margin"].default == DEFAULTS.context_margin == opts.context_margin
    assert sig["matte_threshold"].default == DEFAULTS.matte_threshold
    for command in ("generate", "eval"):
        parser = _subparser(command)
        for name in ("steps", "seed", "cfg", "shift", "strength"):
            assert parser.get_default(name) == getattr(DEFAULTS, name), (command, name)


def test_training_shares_the_shift():
    from training.config import TrainConfig

    assert TrainConfig.__dataclass_fields__["shift"].default == DEFAULTS.shift
