"""The LightningCLI runner behind ``instaflow-pl fit / validate / test / predict`` (and ``pairs``, ``evaluate``).

:func:`cli_main` runs one subcommand in this process: LightningCLI with the project's parser (one-line errors), config
logging, safe checkpoint reading, its progress bar and model summary, and threads that follow the machine's load while
a command runs. The ``instaflow-pl`` dispatcher (:mod:`instaflow_pl.cli`), the demo's stages and the sweep runner call
it; it imports none of them.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from instaflow_pl.runtime import configure_openmp

configure_openmp()  # before torch loads (through lightning below): idle OpenMP threads spin briefly, then sleep

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback  # noqa: E402

from instaflow_pl.errors import UserError  # noqa: E402

ALIASES = {"pairs": "predict", "evaluate": "predict"}
"""Friendlier names for LightningCLI subcommands."""


class LoggedConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` in the log folder, as LightningCLI does, and logs the same resolved config to every logger
    (with W&B: the run's config, so a run records exactly how it was launched)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        """Log the config as nested hyperparameters (``model.init_args.optimizer.init_args.lr`` ...): the text of
        the ``config.yaml`` just saved, else the config dumped again."""
        if trainer.loggers:
            import yaml

            saved = Path(trainer.log_dir) / self.config_filename if trainer.log_dir else None
            if self.save_to_log_dir and not self.multifile and saved is not None and saved.is_file():
                text = saved.read_text()
            else:
                text = self.parser.dump(self.config, skip_none=False)
            config = yaml.safe_load(text)
            for logger in trainer.loggers:
                logger.log_hyperparams(config)


_REPORT_LINES = (
    "Does not validate against",
    "Subtypes:",
    "Errors:",
    "Expected a <class 'NoneType'>",
    "Given value",
    "Problem with given class_path",
)


def one_line_parser_error(message: str) -> str:
    """jsonargparse's nested report of a config mistake as one line: the option's full key, what is wrong with it
    (in jsonargparse's words, e.g. ``Option 'lrr' is not accepted``) and what to do."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    class_path = re.search(r"Problem with given class_path '([^']+)'", message)
    lines = [re.sub(r'^Parser key "[^"]+":\s*', "", line.strip().lstrip("-").strip()) for line in message.splitlines()]
    details = [line for line in lines if line and not line.startswith(_REPORT_LINES)]
    detail = details[0] if details else message.strip()
    if not keys:
        if "unrecognized arguments" in detail or "does not accept option" in detail:
            return f"{detail}; check the spelling (--help lists the options)"
        return detail
    key = keys[0] + (".init_args" if class_path else "") + "".join(f".{k}" for k in keys[1:])
    if found := re.search(r"(Option '[^']+' is not accepted)", detail):
        inner = re.search(r"Namespace\(class_path='([^']+)'", detail)
        owner = inner[1] if inner else class_path[1] if class_path else None
        where = f" by {owner}" if owner else ""
        listing = f" (--{keys[0]}.help {owner.rsplit('.', 1)[-1]} lists them)" if owner and not inner else ""
        return f"{key}: {found[1]}{where}; check its spelling against the options{listing}"
    if found := re.search(r"Expected a <class '([^']+)'>\. Got value: (.*)", detail):
        return f"{key} must be of type {found[1]}, got {found[2]!r}; fix the value in the config or on the command line"
    if class_path and "has no attribute" in detail:
        return f"{key}: cannot import class_path {class_path[1]!r} ({detail}); check the class name"
    return f"{key}: {detail[:300]}"


class OneLineErrorParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors are one line (jsonargparse prints the usage and a nested report)."""

    def save(self, cfg, path, *args, skip_validation: bool = True, **kwargs) -> None:
        """Save a config as jsonargparse does, by default without validating it again: the configs saved here
        (LightningCLI's ``config.yaml``) were validated when they were parsed (with the single dump in
        :class:`LoggedConfigCallback`: a tiny fit's command 4.19 -> 3.85 s, median of 6)."""
        super().save(cfg, path, *args, skip_validation=skip_validation, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        """Print ``instaflow-pl: error: <one line>`` and exit with status 2."""
        if not self.exit_on_error:
            return super().error(message, ex)
        self._logger.error(message)
        sys.stderr.write(f"instaflow-pl: error: {one_line_parser_error(message)}\n")
        self.exit(2)


class InstaFlowCLI(LightningCLI):
    """LightningCLI with the project's defaults: predictions are written by callbacks, never kept in memory."""

    trust_checkpoint = False
    """Set for a run with --weights_only=false: the checkpoint is then read only by the Trainer, with full pickle."""
    only_subcommand: str | None = None
    """The subcommand named on the command line: only its parser is built (all four take ~0.3 s of every command)."""

    def subcommands(self) -> dict[str, set[str]]:
        """LightningCLI's subcommands, or only the one being run."""
        every = LightningCLI.subcommands()
        if self.only_subcommand in every:
            return {self.only_subcommand: every[self.only_subcommand]}
        return every

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters with weights_only=True before the run, which refuses a
        # pickle checkpoint even when the user trusts it; with --weights_only=false that pre-read is skipped.
        if self.trust_checkpoint or not self.config.get("subcommand"):
            return
        settings = self.config[self.config.subcommand]
        ckpt_path = settings.get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        from instaflow_pl.checkpoints import read_checkpoint, read_record

        checkpoint = read_checkpoint(ckpt_path, trust_option="--weights_only=false")
        # The hyperparameters below would replace the configured module class with the checkpoint's: a ReflowModule
        # checkpoint given to a distillation config would silently train a ReflowModule. Refuse that first.
        klass = _configured_flow_module(settings.get("model"))
        if klass is not None:
            read_record(checkpoint, klass.__name__, source=str(ckpt_path))
        hparams = dict(checkpoint.get("hyper_parameters", {}))
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        unknown = sorted(set(hparams) - {"_class_path"} - _init_parameters(klass)) if klass is not None else []
        if unknown:
            raise UserError(
                f"the model settings saved in {ckpt_path} do not parse with this version (options "
                f"{', '.join(unknown)} are not accepted by {klass.__name__}); start from an export of it, or use the "
                "version that wrote it"
            )
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.parser.exit_on_error = False
        try:
            self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)
        except argparse.ArgumentError as err:
            raise UserError(
                f"the model settings saved in {ckpt_path} do not parse with this version "
                f"({one_line_parser_error(str(err))}); start from an export of it, or use the version that wrote it"
            ) from None
        finally:
            self.parser.exit_on_error = True

    def before_instantiate_classes(self) -> None:
        """Quiet W&B's warnings about settings Lightning passes when the run logs to W&B."""
        settings = self.config.get(self.config.get("subcommand") or "", self.config)
        if "Wandb" in str(settings.get("trainer", {}).get("logger", "")):
            from instaflow_pl.runtime import quiet_wandb

            quiet_wandb()

    def before_fit(self) -> None:
        """Refuse what does not compose with the strategy (sharded training) before any rank starts."""
        self._check_strategy()

    def before_validate(self) -> None:
        """As :meth:`before_fit`."""
        self._check_strategy()

    def _check_strategy(self) -> None:
        from instaflow_pl.sharding import check_sharded_run

        check_sharded_run(self.trainer, self.model, self.config[self.config.subcommand].get("ckpt_path"))

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # One progress bar per long step, steps out of max_steps for step-bounded fits (unless the config chose one).
        from lightning.pytorch.callbacks import ModelSummary, ProgressBar

        import instaflow_pl.sharding  # noqa: F401 - registers --trainer.strategy=sharded
        from instaflow_pl.callbacks.progress import StepProgressBar
        from instaflow_pl.callbacks.summary import ParameterSummary
        from instaflow_pl.callbacks.threads import AdaptiveThreads
        from instaflow_pl.runtime import adapts_threads, command_running, thread_count

        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        chosen = any(isinstance(c, ProgressBar) for c in [*configured, *callbacks])
        if config.get("enable_progress_bar", True) is not False and not chosen:
            callbacks = [*callbacks, StepProgressBar()]
        # Parameters per part, without Lightning's FLOPs column (0: our modules have no example input)
        summarized = any(isinstance(c, ModelSummary) for c in [*configured, *callbacks])
        if config.get("enable_model_summary", True) is not False and not summarized:
            callbacks = [*callbacks, ParameterSummary()]
        if command_running() and adapts_threads():  # every core while the machine is idle, one when it is shared
            callbacks = [*callbacks, AdaptiveThreads(thread_count())]
        return super()._instantiate_trainer(config, callbacks)

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        # The trainer method's own arguments (return_predictions, weights_only) exist only after the base class
        # has built the subcommand parser, so the project's defaults for them are set here.
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        dests = {getattr(action, "dest", None) for action in parser._actions}
        if "return_predictions" in dests:
            parser.set_defaults({"return_predictions": False})  # predictions are written by callbacks
        if "weights_only" in dests:
            # Checkpoints are read without pickle: a crafted file cannot run code. --weights_only=false trusts it.
            parser.set_defaults({"weights_only": True})
        return parser


def _configured_flow_module(model_config) -> type | None:
    """The configured model class (``model.class_path``) if it is one of the project's training modules."""
    import importlib

    from instaflow_pl.modules.base import FlowModule

    class_path = getattr(model_config, "class_path", None)
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module_name, _, class_name = class_path.rpartition(".")
    try:
        klass = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return None  # the parser has reported it
    return klass if isinstance(klass, type) and issubclass(klass, FlowModule) else None


def _init_parameters(klass: type) -> set[str]:
    """Names ``klass(...)`` accepts, following ``**kwargs`` up to the base classes' ``__init__``."""
    import inspect

    names: set[str] = set()
    for cls in klass.__mro__:
        if "__init__" not in cls.__dict__:
            continue
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
        names |= {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


def user_error_in(error: BaseException) -> UserError | None:
    """The UserError behind ``error``, if any (jsonargparse and Lightning wrap exceptions raised in user code)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _unpickling_error_in(error: BaseException | None) -> bool:
    import pickle

    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, pickle.UnpicklingError):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> InstaFlowCLI:
    """Run a LightningCLI subcommand in-process (``args`` as on the command line, without the program name).

    With ``run=False`` the config is parsed and every object instantiated, but nothing runs (``args`` then has no
    subcommand).

    Raises:
        UserError: a problem with the user's config or files, unwrapped from the CLI's own exceptions.
    """
    earlier_wandb_run, failed = _wandb_run(), True
    try:
        cli = _run_cli(args, run)
        failed = False
        return cli
    except Exception as err:
        user_error = user_error_in(err)
        if user_error is None and "ConfigCallback expected" in str(err):
            user_error = UserError(
                f"{str(err).split(' expected ')[1].split(' to NOT exist')[0]} is left from an earlier run; start the "
                "new run in another trainer.default_root_dir (or with a versioned logger), or resume with --ckpt_path"
            )
        if user_error is None and _unpickling_error_in(err):
            user_error = UserError(
                "the checkpoint holds objects that are not plain data, so it was not loaded (loading them could run "
                "code from the file); pass --weights_only=false only if you trust its source"
            )
        if user_error is None:
            raise
        raise user_error from None
    finally:
        if run:
            _finish_wandb_run(earlier_wandb_run, failed)


def _wandb_run():
    """The active W&B run of this process, if wandb was imported."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None)


def _finish_wandb_run(earlier, failed: bool) -> None:
    """Finish the W&B run a subcommand started (WandbLogger leaves it open), so its files are complete and the next
    in-process run gets a run of its own."""
    current = _wandb_run()
    if current is not None and current is not earlier:
        current.finish(exit_code=1 if failed else 0)


def _check_ckpt_path(argv: Sequence[str]) -> None:
    """A missing checkpoint file is one clear line, not Lightning's traceback."""
    for i, arg in enumerate(argv):
        if arg.startswith("--ckpt_path="):
            value = arg.split("=", 1)[1]
        elif arg == "--ckpt_path" and i + 1 < len(argv):
            value = argv[i + 1]
        else:
            continue
        if value not in ("last", "best", "hpc", "registry", "null", "None") and "://" not in value:
            path = Path(value).expanduser()
            if not path.is_file() and not (path / ".metadata").is_file():  # a file, or a sharded checkpoint folder
                raise UserError(
                    f"checkpoint not found: {value!r} (give a .ckpt file, or 'last' to resume the last one)"
                )


def _run_cli(args: Sequence[str] | None, run: bool) -> InstaFlowCLI:
    import lightning as L

    if args is not None:
        args = list(args)
        if args and args[0] in ALIASES:
            args[0] = ALIASES[args[0]]
    elif len(sys.argv) > 1 and sys.argv[1] in ALIASES:
        # Rewritten in place: DDP's launcher restarts the other ranks with sys.argv.
        sys.argv[1] = ALIASES[sys.argv[1]]
    argv = sys.argv[1:] if args is None else args
    predicting = bool(argv) and argv[0] == "predict"
    # A resumed run rewrites its own config.yaml; a new run never replaces an earlier run's.
    resuming = any(a == "--ckpt_path" or a.startswith("--ckpt_path=") for a in argv)
    # LightningCLI reads a checkpoint's hyperparameters with weights_only=True before the run; a user who trusts a
    # pickle checkpoint (--weights_only=false) gets neither that pre-read nor the safe load.
    trusting = any(a.lower() == "--weights_only=false" for a in argv) or any(
        a == "--weights_only" and b.lower() == "false" for a, b in zip(argv, argv[1:], strict=False)
    )
    _check_ckpt_path(argv)
    # omegaconf+ resolves ${...} interpolations after the command-line overrides, so --trainer.default_root_dir=DIR
    # moves everything configured as ${trainer.default_root_dir}/... (checkpoints, the W&B run) along with it;
    # interpolations written from the config's root keep working under a subcommand (fit.trainer...).
    from jsonargparse import set_parsing_settings

    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    settings = {"trust_checkpoint": trusting, "only_subcommand": argv[0] if argv else None}
    cli_class = type("InstaFlowCLI", (InstaFlowCLI,), settings)
    return cli_class(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        parser_kwargs={"parser_mode": "omegaconf+"},
        parser_class=OneLineErrorParser,
        # Pair generation records its settings in the dataset's manifest.json; a config.yaml there would be noise.
        save_config_callback=None if predicting else LoggedConfigCallback,
        save_config_kwargs={"overwrite": resuming},
        auto_configure_optimizers=False,
        run=run,
    )
