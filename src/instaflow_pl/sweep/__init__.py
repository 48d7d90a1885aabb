"""Hyperparameter sweeps in W&B's sweep format, run by a W&B server or here, offline, trial by trial.

A sweep file (``configs/sweeps/*.yaml``) is a W&B sweep configuration: ``method`` (``grid``, ``random``, ``bayes``),
``metric`` (``name`` and ``goal``), ``parameters`` named by their LightningCLI keys
(``model.init_args.optimizer.init_args.lr``) and a ``command`` with W&B's macros, e.g.
``[${env}, ${program}, fit, --config, configs/tiny/sd/reflow.yaml, ${args}]`` with ``program: instaflow-pl``.

- With a W&B server (``WANDB_MODE=online``, logged in): ``instaflow-pl sweep FILE`` creates the sweep and runs an
  agent on it (what ``wandb sweep FILE`` and ``wandb agent ID`` do).
- Without one: ``instaflow-pl sweep --local FILE --trials N`` asks W&B's own sweep engine (the ``sweeps`` package
  the W&B server runs: grid, random and bayes with W&B's semantics) for each trial's values, feeding it the finished
  trials' metrics as the server would, runs each trial as its own ``instaflow-pl fit`` process in ``OUT/trial-NNN``
  (the values as command-line overrides, exactly as the W&B agent passes them) and prints a table sorted by the
  sweep's metric (also ``OUT/summary.md`` and ``summary.json``).

Before anything runs, the trial command is parsed with the first proposed values, so a parameter that is not a key
of the command's config is one clear error, not a sweep of failed runs.

The modules, each one job, in the order they depend on each other:

- :mod:`~instaflow_pl.sweep.spec`: the sweep file, read and checked (:class:`Sweep`), and a trial's result;
- :mod:`~instaflow_pl.sweep.engine`: W&B's engine proposing each trial's values (``propose``, ``plan``);
- :mod:`~instaflow_pl.sweep.command`: a trial's command (W&B's macros expanded) and its check by the CLI's parser;
- :mod:`~instaflow_pl.sweep.summary`: the trials ranked by the metric, ``summary.md`` and ``summary.json``;
- :mod:`~instaflow_pl.sweep.local`: the local runner (``--local``), one process per trial;
- :mod:`~instaflow_pl.sweep.agent`: the sweep on a W&B server (``wandb sweep`` + ``wandb agent``);
- :mod:`~instaflow_pl.sweep.main`: the ``instaflow-pl sweep`` command.

Each trial writes its final metrics with the :class:`instaflow_pl.callbacks.FinalMetrics` callback.
"""
