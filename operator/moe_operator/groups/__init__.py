"""Replica groups of a MoEDeployment (pure): their names and labels, and the rollout decision
(which groups to start, drain, remove or restart; surge before drain, one group at a time)."""
