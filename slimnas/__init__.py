"""slimnas: the best smaller version of a causal LM by structured pruning plus knowledge distillation.

The stages live in sub-packages, lowest first: `compress` (teacher, corpus, importance, pruning,
distillation), `bench` (lm-eval, speed, memory), `search` (the study, retraining), `reports`
(leaderboard, plots, page). Modules here sit above all four: the CLI and the recipes that chain stages.
A module imports only from its own package or the ones below it.
"""
