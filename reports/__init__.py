"""Reports: tables of records, leaderboards and Pareto plots."""
