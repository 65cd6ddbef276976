"""Architecture search: search space, Optuna study, objectives, constraints, storage, and the CLI."""
