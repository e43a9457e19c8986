"""Run the tinker-cookbook's `sl_basic` recipe on the conversations file the cookbook ships.

Runs inside the cookbook's own virtual environment and imports the cookbook unmodified.
`tinker_cookbook/recipes/sl_basic.py` cannot be started as `python -m` for a base outside
the cookbook's model table: before it reads its options it asks `model_info` for the
recommended renderer, which raises `ConfigurationError: Unknown model` for any organisation
it does not list (SmolLM2's included), and its file dataset sits behind an `if 0:` (the
recipe's own comment says to swap it in). So this builds the blueprint sl_basic builds,
with the renderer given on the command line and `FromConversationFileBuilder` over
`tinker_cookbook/example_data/conversations.jsonl` as the recipe's comment describes, then
calls the recipe's own `main`. Every other option is sl_basic's, and any `key=value`
argument overrides it exactly as on sl_basic's command line:

    python tools/cookbook_sl_basic.py model_name=HuggingFaceTB/SmolLM2-135M-Instruct \\
        renderer_name=qwen3_instruct max_steps=2 batch_size=4 max_length=256 log_path=...
"""

from __future__ import annotations

import sys
from pathlib import Path

import chz
import tinker_cookbook
from tinker_cookbook import cli_utils
from tinker_cookbook.recipes import sl_basic
from tinker_cookbook.renderers import TrainOnWhat
from tinker_cookbook.supervised import train
from tinker_cookbook.supervised.data import FromConversationFileBuilder
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

CONVERSATIONS = Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"
#: Options of the dataset, not of `train.Config`; sl_basic fixes them in its blueprint.
DATASET_OPTIONS = {"batch_size": 128, "max_length": 32768}


def take_option(argv: list[str], name: str, default: str | None) -> tuple[str | None, list[str]]:
    """The last `name=value` in argv (chz's precedence) and argv without it."""
    value, rest = default, []
    for arg in argv:
        if arg.startswith(f"{name}="):
            value = arg.removeprefix(f"{name}=")
        else:
            rest.append(arg)
    return value, rest


def build_blueprint(argv: list[str]) -> chz.Blueprint[train.Config]:
    model_name = cli_utils.model_name_from_argv(argv, default=sl_basic.DEFAULT_MODEL_NAME)
    renderer_name, argv = take_option(argv, "renderer_name", None)
    if renderer_name is None:
        sys.exit("give renderer_name=... (sl_basic's model table does not know this model)")
    dataset_options = {}
    for name, default in DATASET_OPTIONS.items():
        value, argv = take_option(argv, name, str(default))
        dataset_options[name] = int(value or default)
    common_config = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=model_name,
        renderer_name=renderer_name,
        train_on_what=TrainOnWhat.ALL_ASSISTANT_MESSAGES,
        **dataset_options,
    )
    dataset = FromConversationFileBuilder(common_config=common_config, file_path=str(CONVERSATIONS))
    return (
        chz.Blueprint(train.Config)
        .apply(
            {
                "log_path": cli_utils.runs_path("sl_basic"),
                "model_name": model_name,
                "recipe_name": "recipe_sl_basic",
                "renderer_name": renderer_name,
                "dataset_builder": dataset,
                "learning_rate": 2e-4,
                "lr_schedule": "linear",
                "num_epochs": 1,
                "eval_every": 8,
            }
        )
        .apply_from_argv(argv)
    )


if __name__ == "__main__":
    sl_basic.main(build_blueprint(sys.argv[1:]).make())
