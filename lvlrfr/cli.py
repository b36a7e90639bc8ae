"""Command line: ``lvlrfr fit|validate|test|predict`` (LightningCLI) and ``lvlrfr evaluate|prepare|teachers``.

Examples::

    lvlrfr fit --config configs/generative.yaml
    lvlrfr fit --config configs/generative.yaml --print_config > my.yaml
    lvlrfr evaluate --config configs/evaluate.yaml
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lvlrfr.data.datamodule import LowResFaceDataModule
from lvlrfr.utils.checkpoint import AtomicCheckpointIO, FinalCheckpoint
from lvlrfr.utils.errors import USER_ERRORS, exit_with_error, make_concise

logger = logging.getLogger("lvlrfr")

#: Subcommands outside LightningCLI: name -> module with a ``main(argv)`` function.
EXTRA_COMMANDS = {
    "evaluate": "lvlrfr.commands.evaluate",
    "prepare": "lvlrfr.commands.prepare",
    "teachers": "lvlrfr.commands.teachers",
}


def configure_environment() -> None:
    """Set defaults that keep runs offline-friendly; values already in the environment win."""
    # W&B logs to local files unless the user opts in with WANDB_MODE=online and an account.
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    logging.basicConfig(
        level=os.environ.get("LVLRFR_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


#: LightningCLI's parser with short errors: the problem and the key, without the full usage text.
LvlrfrArgumentParser = make_concise(LightningArgumentParser)


class LvlrfrCLI(LightningCLI):
    """LightningCLI for the stages: any stage class as ``model``, always ``LowResFaceDataModule`` as ``data``."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            model_class=None,
            datamodule_class=LowResFaceDataModule,
            subclass_mode_model=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "lvlrfr"},
            parser_class=LvlrfrArgumentParser,
            args=args,
            run=run,
        )

    def instantiate_trainer(self, **kwargs: Any):
        kwargs = add_run_folder_defaults(self.config_init[self.subcommand], kwargs)
        trainer = super().instantiate_trainer(**kwargs)
        strategy = trainer.strategy
        # Write checkpoints atomically unless the user configured their own checkpoint I/O.
        if type(strategy.checkpoint_io).__name__ == "TorchCheckpointIO":
            strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def add_run_folder_defaults(config: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Derive checkpoints and loggers from ``trainer.default_root_dir`` unless the config sets them.

    A stage writes ``<root>/checkpoints/last.ckpt`` (for ``--ckpt_path last``) and, when it finishes,
    ``<root>/checkpoints/final.ckpt`` (read by the next stage); metrics go to ``<root>/csv`` and W&B.
    Moving a run is then a single ``--trainer.default_root_dir`` override.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    trainer = config["trainer"]
    root = trainer.get("default_root_dir")
    if not root or trainer.get("fast_dev_run"):
        return kwargs
    callbacks = trainer.get("callbacks") or []
    callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
    if trainer.get("enable_checkpointing") is not False:
        if not any(isinstance(callback, ModelCheckpoint) for callback in callbacks):
            callbacks.append(ModelCheckpoint(dirpath=f"{root}/checkpoints", save_last=True, save_top_k=0))
        if not any(isinstance(callback, FinalCheckpoint) for callback in callbacks):
            callbacks.append(FinalCheckpoint(dirpath=f"{root}/checkpoints"))
    kwargs["callbacks"] = callbacks
    if trainer.get("logger") in (None, True):
        stage_name = type(config["model"]).__name__
        kwargs["logger"] = [
            CSVLogger(save_dir=root, name="", version="csv"),
            WandbLogger(save_dir=root, project="lvlrfr", name=stage_name, group=str(root)),
        ]
    return kwargs


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lvlrfr`` console script."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_environment()
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            module = importlib.import_module(EXTRA_COMMANDS[argv[0]])
            module.main(argv[1:])
        else:
            # LightningCLI reads sys.argv itself; passing it again as args triggers a warning.
            LvlrfrCLI(args=None if from_command_line else argv)
    except USER_ERRORS as error:
        exit_with_error(error)


if __name__ == "__main__":
    main()
